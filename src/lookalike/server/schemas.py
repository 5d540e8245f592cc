"""Response bodies, as the OpenAPI description shows them. No field ever holds a server-side file path."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    """A product's record from the catalog's products.csv / products.jsonl; unset fields are left out, further
    columns of the file pass through as attributes."""

    model_config = ConfigDict(extra="allow")

    product_id: str
    name: str | None = None
    url: str | None = Field(None, description="the product's page (http or https)")
    price: float | None = None
    currency: str | None = Field(None, description="ISO 4217 code, like EUR")
    category: str | None = None
    brand: str | None = None
    tags: list[str] | None = None


class Hit(BaseModel):
    """One matching product (or image). Keys the engine adds later pass through."""

    model_config = ConfigDict(extra="allow")

    rank: int = Field(description="1 is the best match")
    product_id: str
    similarity: float = Field(description="higher is more alike (cosine: -1..1; l2: 1 / (1 + distance))")
    image_id: str = Field(description="the best-matching catalog image; fetch it from image_url")
    image_url: str
    thumbnail_url: str
    record: Record | None = Field(None, description="the product's record (name, price, link...); null: none")
    match: bool | None = Field(
        None,
        description='false: below the calibrated "no match" threshold (likely not this product); null: no calibration',
    )


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for a free search slot")
    search_ms: float = Field(description="decoding the photo, the model and the index")
    total_ms: float = Field(description="the whole request, upload included")


class SearchResponse(BaseModel):
    results: list[Hit]
    top_k: int
    by_product: bool
    min_similarity: float | None
    only_matches: bool = False
    where: list[str] = Field([], description="the filter as understood, one clause per entry")
    box: list[float] | None = Field(None, description="the region searched: x0, y0, x1, y1 (pixels)")
    timings: Timings
    build_id: str = Field(description="the index generation that answered")


class SimilarResponse(BaseModel):
    product_id: str
    results: list[Hit]
    top_k: int
    min_similarity: float | None
    where: list[str] = Field([], description="the filter as understood, one clause per entry")
    build_id: str


class Region(BaseModel):
    box: list[int] = Field(description="x0, y0, x1, y1 in pixels of the uploaded photo (x1, y1 exclusive)")
    score: float = Field(description="the similarity of the region's best result")
    hits: list[Hit]


class RegionsResponse(BaseModel):
    regions: list[Region] = Field(description="best first; empty: no catalog product found in the photo")
    top_k: int
    max_regions: int
    min_similarity: float | None
    where: list[str]
    timings: Timings
    build_id: str


class FacetValue(BaseModel):
    value: str
    count: int = Field(description="indexed products with this value")


class PriceRange(BaseModel):
    min: float
    max: float
    currencies: list[str]


class AttributeFacet(BaseModel):
    field: str = Field(description="a further column of the records, usable in where=")
    kind: str = Field(description="text, number, bool or list")
    values: list[FacetValue] | None = Field(None, description="text, bool, list: the values with product counts")
    min: float | None = None
    max: float | None = None


class Facets(BaseModel):
    products: int = Field(description="products in the index")
    with_records: int = Field(description="of which have a record")
    fields: dict[str, list[str]] = Field(description="every field where= may name, with the kinds of its values")
    category: list[FacetValue]
    brand: list[FacetValue]
    tags: list[FacetValue]
    price: PriceRange | None
    attributes: list[AttributeFacet] = Field(description="the further columns a filter control can be made for")


class AddImagesResponse(BaseModel):
    product_id: str
    added: int = Field(description="new images indexed (a photo already in the product is not added twice)")
    images: int = Field(description="images in the index now")
    image_ids: list[str]
    image_urls: list[str]


class RemoveProductResponse(BaseModel):
    product_id: str
    removed: int = Field(description="images taken out of the index")
    images: int = Field(description="images in the index now")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description="ready, loading or failed")
    images: int | None = None
    build_id: str | None = None
    detail: str | None = None


class Stats(BaseModel):
    model_config = ConfigDict(extra="allow")

    products: int
    images: int
    server: dict[str, Any]


class Error(BaseModel):
    detail: Any = Field(description="what went wrong, in words (validation errors: a list of problems)")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in {
        401: "missing or wrong admin token",
        403: "catalog changes are disabled (no admin token configured)",
        404: "unknown product or image",
        413: "upload larger than max_upload_bytes, or an image with too many pixels",
        415: "not an image, or not a format that is accepted",
        422: "invalid parameters or product id (the rule is in the message), or an image that cannot be decoded",
        503: "overloaded, the index is not loaded yet, or the catalog is read-only or busy: see Retry-After",
        507: "the server's disk is full: the catalog change was not made",
    }.items()
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: ERRORS[code] for code in codes}
