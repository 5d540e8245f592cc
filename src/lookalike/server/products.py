"""Product search over HTTP: filters (``where=``), query crops (``box=``), "only matches", several products in one
photo (``POST /search/regions``) and the facets the page's filter controls are built from (``GET /facets``).

The query parameters are checked before the upload is read (a bad filter or box costs the server nothing), and
the searches go through the same gate as ``POST /search``: a place is reserved before a byte of the body is read.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from ..filters import FilterError
from ..imaging import ImageError, parse_box
from ..products import BoxError
from . import schemas
from .facets import catalog_facets
from .failures import trim_memory, write_error_names, write_failed
from .state import ServerState
from .uploads import IMAGE_BODY, image_error_status, read_images
from .wire import require_ready, server_state, wire_hit

TRIM_AFTER_BYTES = 1024 * 1024  # after an upload this big, hand freed heap memory back to the system
THUMBNAIL_SIZE = 256
MAX_TOP_K = 100
MAX_REGIONS = 50

WHERE_GRAMMAR = """Only products whose record passes (repeatable: every clause must hold). One clause per value:

| clause | meaning |
|---|---|
| `category=dairy` | equal |
| `brand=Arla,Oatly` | one of |
| `brand!=Arla` / `brand!=Arla,Oatly` | not equal / none of (a product without the field passes) |
| `price<=20`, `price<20`, `price>=5`, `price>5` | numbers only |
| `tags~organic` / `tags~organic,vegan` | has the tag / has any of them |

Fields: `product_id name url price currency category brand tags` and the extra columns of the catalog's records
(`GET /facets` lists them with their values). Values are exact (case matters); `\\,` is a comma inside a value.
An unknown field or a bad value answers 422 naming the known fields."""
BOX_HELP = (
    "Search only this region of the photo: `x0,y0,x1,y1` in pixels of the photo as uploaded (after its EXIF "
    "rotation), x1 and y1 exclusive; clipped to the photo. A box outside the photo answers 422."
)
ONLY_MATCHES_HELP = (
    'Keep only results the calibrated "no match" threshold accepts (`match: true`); an empty list then means '
    '"not in the catalog". Without calibration every result is kept.'
)

Where = Query(None, description=WHERE_GRAMMAR)
Box = Query(None, max_length=200, description=BOX_HELP, examples=["120,40,560,480"])
OnlyMatches = Query(False, description=ONLY_MATCHES_HELP)
MinSimilarity = Query(None, ge=-1.0, le=1.0, allow_inf_nan=False, description="drop weaker matches")

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


def check_box(box: str | None) -> tuple[float, float, float, float] | None:
    if box is None or not box.strip():
        return None
    try:
        return parse_box(box, source="box")
    except ImageError as exc:
        raise HTTPException(422, exc.reason) from None


def clauses(where: list[str] | None) -> list[str]:
    """The where= clauses given (blank ones mean nothing); the engine parses them against the loaded records'
    fields, before any photo is decoded, and a bad one answers 422 naming the known fields."""
    return [w for w in where or [] if w.strip()]


async def gated_search(state: ServerState, request: Request, fn: Callable[..., Any]) -> tuple[Any, float, float]:
    """Reserve a place in the search gate (503 when full, before the body is read), read the one uploaded photo,
    run ``fn(photo)`` in the gate; returns (result, seconds queued, seconds run). Image, filter and box problems
    answer 4xx, a failed spool to disk 507/503."""
    place = state.gate.reserve()
    photo = b""
    try:
        (photo,) = await read_images(request, state.settings.max_upload_bytes)
        return await state.gate.run(fn, photo, place=place)
    except BoxError as exc:  # a box outside the photo (its form was checked before the upload was read)
        raise HTTPException(422, exc.reason) from None
    except ImageError as exc:
        raise HTTPException(image_error_status(exc.reason), f"cannot use the uploaded photo: {exc.reason}") from None
    except FilterError as exc:  # unknown field or bad value: one line naming the known fields
        raise HTTPException(422, str(exc)) from None
    except write_error_names() as exc:  # spooling the upload to disk failed
        raise write_failed(exc, "receive the photo") from None
    finally:
        place.release()  # no-op once the search holds it: its thread gives it back
        if len(photo) > TRIM_AFTER_BYTES:
            del photo
            await run_in_threadpool(trim_memory)


def timings(start: float, waited: float, ran: float) -> dict[str, float]:
    return {
        "queue_ms": round(waited * 1000, 2),
        "search_ms": round(ran * 1000, 2),
        "total_ms": round((time.perf_counter() - start) * 1000, 2),
    }


@router.post(
    "/search/regions",
    response_model=schemas.RegionsResponse,
    tags=["search"],
    openapi_extra=IMAGE_BODY,
    responses=schemas.errors(413, 415, 422, 503),
)
async def search_regions(
    request: Request,
    state: State,
    top_k: int = Query(3, ge=1, le=MAX_TOP_K, description="results per region"),
    max_regions: int = Query(10, ge=1, le=MAX_REGIONS, description="at most this many regions"),
    min_similarity: float | None = MinSimilarity,
    where: list[str] | None = Where,
):
    """Several products in one photo: the regions that each show a catalog product, best first, each with its box
    (pixels of the photo as uploaded) and its results. Windows over the photo are searched and the confident,
    non-overlapping ones kept; on a calibrated index only regions whose best result is a match."""
    start = time.perf_counter()
    require_ready(state)
    engine = state.engine
    where = clauses(where)
    run = functools.partial(
        engine.search_regions, top_k=top_k, max_regions=max_regions, min_similarity=min_similarity, where=where or None
    )
    regions, waited, ran = await gated_search(state, request, run)
    state.metrics.observe_search(waited, ran)
    return {
        "regions": [
            {
                "box": list(r.box),
                "score": r.score,
                "hits": [wire_hit(request, engine, h, THUMBNAIL_SIZE) for h in r.hits],
            }
            for r in regions
        ],
        "top_k": top_k,
        "max_regions": max_regions,
        "min_similarity": min_similarity,
        "where": where,
        "timings": timings(start, waited, ran),
        "build_id": engine.build_id,
    }


@router.get("/facets", response_model=schemas.Facets, tags=["search"], responses=schemas.errors(503))
def facets(state: State):
    """What the products' records hold, for filter controls: every field a `where=` clause may name (with the kinds
    of value it holds), the categories, brands and tags with their product counts, and the price range."""
    require_ready(state)
    engine = state.engine
    return catalog_facets(engine.records, engine.images_per_product())


__all__ = ["Box", "MinSimilarity", "OnlyMatches", "Where", "check_box", "clauses", "gated_search", "router"]
