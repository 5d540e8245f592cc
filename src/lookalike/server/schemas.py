"""Response bodies, as the OpenAPI description shows them. No field ever holds a server-side file path."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Hit(BaseModel):
    """One matching product (or image). Keys the engine adds later pass through."""

    model_config = ConfigDict(extra="allow")

    rank: int = Field(description="1 is the best match")
    product_id: str
    similarity: float = Field(description="higher is more alike (cosine: -1..1; l2: 1 / (1 + distance))")
    image_id: str = Field(description="the best-matching catalog image; fetch it from image_url")
    image_url: str
    thumbnail_url: str


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting for a free search slot")
    search_ms: float = Field(description="decoding the photo, the model and the index")
    total_ms: float = Field(description="the whole request, upload included")


class SearchResponse(BaseModel):
    results: list[Hit]
    top_k: int
    by_product: bool
    min_similarity: float | None
    timings: Timings
    build_id: str = Field(description="the index generation that answered")


class SimilarResponse(BaseModel):
    product_id: str
    results: list[Hit]
    top_k: int
    min_similarity: float | None
    build_id: str


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
