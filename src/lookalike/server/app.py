"""The HTTP app: FastAPI over one :class:`~lookalike.ImageSearchEngine`.

``create_app()`` builds it (tests pass a built engine; otherwise the index is loaded at start-up, in the lifespan
hook, in a background thread so that /healthz answers at once and /readyz says when searches can start).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine import ImageSearchEngine, UnknownProductError
from ..filters import FilterError
from ..ids import InvalidProductIdError, normalize_product_id
from ..imaging import ImageError, open_image
from ..settings import Settings
from . import products, schemas
from .failures import ClientDisconnect, client_gone, trim_memory, write_error_names, write_failed
from .gate import Overloaded, SearchGate
from .images import EXTENSIONS, NotInCatalog, catalog_file, media_type
from .metrics import CONTENT_TYPE, MetricsMiddleware
from .state import PAGE_FILES, ServerState
from .uploads import IMAGE_BODY, IMAGES_BODY, Upload, image_error_status, receive_uploads, safe_file_name
from .wire import require_ready as _require_ready
from .wire import scrub_paths as _scrub_paths
from .wire import wire_hit

logger = logging.getLogger(__name__)

MAX_TOP_K = products.MAX_TOP_K
MAX_ID_LENGTH = 200  # characters in a path; the id rule (lookalike.ids) then limits its UTF-8 bytes
TRIM_AFTER_BYTES = products.TRIM_AFTER_BYTES
FILE_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
THUMBNAIL_SIZE = products.THUMBNAIL_SIZE
SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
TopK = Query(5, ge=1, le=MAX_TOP_K, description="how many results")
BEARER = HTTPBearer(auto_error=False, description="the admin token: settings.admin_token / LOOKALIKE_ADMIN_TOKEN")
MinSimilarity = products.MinSimilarity


def create_app(
    settings: Settings | None = None,
    *,
    engine: ImageSearchEngine | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. ``engine`` (built or loaded) is used as is; without one, the index named by ``settings`` is loaded
    at start-up. ``on_load_failure(message)`` is called if that load fails (the CLI stops the server)."""
    if settings is None:
        settings = engine.settings if engine is not None else Settings()
    if engine is None:
        from ..runtime import server_settings  # searches x network threads <= cores

        engine = ImageSearchEngine(server_settings(settings))
    state = ServerState(engine, settings, SearchGate(settings.max_concurrent_searches, settings.search_queue_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading(on_load_failure)
        try:
            yield
        finally:
            state.gate.shutdown()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        summary="Visual product search: which products of the catalog look like this photo?",
        lifespan=lifespan,
        docs_url=None,  # served below from bundled files: FastAPI's own page loads Swagger UI from a CDN
        redoc_url=None,
    )
    app.state.lookalike = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, _internal_error)
    _routes(app, state)
    app.include_router(products.router)
    return app


async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
    retry = getattr(exc, "retry_after", 1)
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(retry)})


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("error answering %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error (the server log has the details)"}, status_code=500)


def _routes(app: FastAPI, state: ServerState) -> None:
    engine, settings = state.engine, state.settings

    def require_ready() -> None:
        _require_ready(state)

    def require_admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        token = settings.admin_token
        if not token:
            raise HTTPException(
                403, "catalog changes are disabled: no admin token is configured (LOOKALIKE_ADMIN_TOKEN)"
            )
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            raise HTTPException(401, "a valid admin bearer token is required", headers={"WWW-Authenticate": "Bearer"})

    def hit(request: Request, h: dict[str, Any]) -> dict[str, Any]:
        return wire_hit(request, engine, h, THUMBNAIL_SIZE)

    def build_id() -> str:
        return engine.build_id

    # --- searching ------------------------------------------------------------------------------------------

    @app.post(
        "/search",
        response_model=schemas.SearchResponse,
        tags=["search"],
        openapi_extra=IMAGE_BODY,
        responses=schemas.errors(413, 415, 422, 503),
    )
    async def search(
        request: Request,
        top_k: int = TopK,
        min_similarity: float | None = MinSimilarity,
        by_product: bool = Query(True, description="one result per product (false: one per image)"),
        only_matches: bool = products.OnlyMatches,
        where: list[str] | None = products.Where,
        box: str | None = products.Box,
    ):
        """The catalog products (or images) that look most like the uploaded photo (or a region of it), best first."""
        start = time.perf_counter()
        require_ready()
        where, region = products.clauses(where), products.check_box(box)  # the box's form before the upload is read
        options = {"by_product": by_product, "min_similarity": min_similarity, "only_matches": only_matches}
        run = functools.partial(engine.search, top_k=top_k, where=where or None, box=region, **options)
        hits, waited, ran = await products.gated_search(state, request, run)  # 503 before a byte is read
        state.metrics.observe_search(waited, ran)
        return {
            "results": [hit(request, h) for h in hits],
            "top_k": top_k,
            **options,
            "where": where,
            "box": list(region) if region is not None else None,
            "timings": products.timings(start, waited, ran),
            "build_id": build_id(),
        }

    @app.get(
        "/products/{product_id}/similar",
        response_model=schemas.SimilarResponse,
        tags=["search"],
        responses=schemas.errors(404, 503),
    )
    def similar(
        request: Request,
        product_id: str = PathParam(max_length=MAX_ID_LENGTH),
        top_k: int = TopK,
        min_similarity: float | None = MinSimilarity,
        where: list[str] | None = products.Where,
    ):
        """More like this: the other products that look most like a product of the catalog."""
        require_ready()
        product_id = _product_id(product_id)
        where = products.clauses(where)
        try:
            hits = engine.similar_to_product(product_id, top_k, min_similarity=min_similarity, where=where or None)
        except UnknownProductError:
            raise HTTPException(404, f"unknown product {product_id!r}") from None
        except FilterError as exc:
            raise HTTPException(422, str(exc)) from None
        return {
            "product_id": product_id,
            "results": [hit(request, h) for h in hits],
            "top_k": top_k,
            "min_similarity": min_similarity,
            "where": where,
            "build_id": build_id(),
        }

    @app.get(
        "/images/{image_id}",
        tags=["catalog"],
        response_class=Response,
        responses={
            200: {"content": {t: {} for t in ("image/jpeg", "image/png", "image/webp")}, "description": "the image"},
            **schemas.errors(404, 503),
        },
    )
    def image(
        image_id: str = PathParam(max_length=64, description="an image_id from a search result"),
        size: int | None = Query(None, ge=16, le=1024, description="a JPEG thumbnail fitting size x size"),
    ):
        """A catalog image by its id (never by path), or a thumbnail of it."""
        require_ready()
        try:
            path = catalog_file(engine, image_id)
        except NotInCatalog as exc:
            logger.warning("refused to serve %s", exc)
            raise HTTPException(404, f"unknown image id {image_id!r}") from None
        except LookupError:
            raise HTTPException(404, f"unknown image id {image_id!r}") from None
        headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
        try:
            if size is None:
                return Response(path.read_bytes(), media_type=media_type(path), headers=headers)
            data = state.thumbnails.get(path, size, settings.max_image_pixels)
        except (OSError, ImageError) as exc:  # removed meanwhile, or a catalog file that no longer decodes
            logger.warning("cannot serve image %s: %s", image_id, getattr(exc, "reason", exc))
            raise HTTPException(404, f"image {image_id!r} cannot be shown") from None
        return Response(data, media_type="image/jpeg", headers=headers)

    # --- catalog changes (admin) ----------------------------------------------------------------------------

    @app.post(
        "/products/{product_id}/images",
        status_code=201,
        response_model=schemas.AddImagesResponse,
        tags=["catalog"],
        dependencies=[Depends(require_admin)],
        openapi_extra=IMAGES_BODY,
        responses=schemas.errors(401, 403, 413, 415, 422, 503, 507),
    )
    async def add_images(request: Request, product_id: str = PathParam(max_length=MAX_ID_LENGTH)):
        """Add photos to a product (a new product is created): copied into the catalog, indexed and saved."""
        require_ready()
        product_id = _product_id(product_id)
        try:
            photos = await receive_uploads(request, settings.max_upload_bytes, many=True)
        except write_error_names() as exc:  # spooling the upload to disk failed
            raise write_failed(exc, "receive the photos") from None
        try:
            out = await run_in_threadpool(_add_photos, engine, settings, product_id, photos)
        finally:
            await photos.close()
            if sum(p.size for p in photos) > TRIM_AFTER_BYTES:
                await run_in_threadpool(trim_memory)
        root = request.scope.get("root_path", "")
        return {**out, "image_urls": [f"{root}/images/{i}" for i in out["image_ids"]]}

    @app.delete(
        "/products/{product_id}",
        response_model=schemas.RemoveProductResponse,
        tags=["catalog"],
        dependencies=[Depends(require_admin)],
        responses=schemas.errors(401, 403, 404, 422, 503, 507),
    )
    def remove_product(product_id: str = PathParam(max_length=MAX_ID_LENGTH)):
        """Take a product out of the index; its folder moves to the catalog's .removed/ folder (recoverable)."""
        require_ready()
        product_id = _product_id(product_id)
        try:
            out = engine.remove_product(product_id)
        except UnknownProductError:
            raise HTTPException(404, f"unknown product {product_id!r}") from None
        except ValueError as exc:  # InvalidProductIdError: the id rule
            raise HTTPException(422, str(exc)) from None
        except write_error_names() as exc:
            raise write_failed(exc, f"remove product {product_id!r}") from None
        return {"product_id": out["product_id"], "removed": out["removed"], "images": out["images"]}

    # --- operations -----------------------------------------------------------------------------------------

    @app.get("/stats", response_model=schemas.Stats, tags=["operations"], responses=schemas.errors(503))
    def stats():
        """Catalog and index facts (counts, model, index size) and the search queue's state."""
        require_ready()
        root = Path(engine.settings.data_dir).expanduser().resolve()
        out = _scrub_paths(engine.get_statistics(), root)
        out.pop("data_dir", None)
        out["server"] = {
            "version": __version__,
            "uptime_s": round(time.time() - state.metrics.started, 1),
            "max_upload_bytes": settings.max_upload_bytes,
            "admin_enabled": bool(settings.admin_token),
            "search_queue": state.gate.stats(),
        }
        return out

    @app.get("/healthz", response_model=schemas.Health, tags=["operations"])
    def healthz():
        """The process is up (it may still be loading the index: see /readyz)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=schemas.Readiness,
        tags=["operations"],
        responses={503: {"model": schemas.Readiness, "description": "loading, or the load failed"}},
    )
    def readyz():
        """Ready once the index is loaded: searches are answered."""
        if not state.ready:
            detail = "the index failed to load (see the server log)" if state.status == "failed" else None
            body = {"status": "failed" if state.status == "failed" else "loading", "detail": detail}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ready", "images": engine.image_count, "build_id": build_id()}

    @app.get("/metrics", tags=["operations"], response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    def metrics():
        """Prometheus metrics: requests by route and status, latencies, search queue, index size."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # --- the page -------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page():
        return Response(state.page["index.html"], media_type=PAGE_FILES["index.html"], headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in PAGE_FILES or name == "index.html":  # a fixed list: the name is never a path
            raise HTTPException(404, "not found")
        return Response(state.page[name], media_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI over /openapi.json, from the copy bundled in static/swagger (Apache-2.0): works offline."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="lookalike API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @app.get("/static/swagger/{name}", include_in_schema=False)
    def swagger_asset(name: str):
        if name not in SWAGGER_FILES:  # a fixed list: the name is never a path
            raise HTTPException(404, "not found")
        data = (resources.files(__package__) / "static" / "swagger" / name).read_bytes()
        return Response(data, media_type=SWAGGER_FILES[name], headers={"Cache-Control": "public, max-age=86400"})


def _product_id(product_id: str) -> str:
    """The canonical form of a product id from a URL (NFC: composed and decomposed "é" are one product), or 422
    stating the rule (no control or bidi characters, a byte limit that leaves room for every derived file name)."""
    try:
        return normalize_product_id(product_id)
    except InvalidProductIdError as exc:
        raise HTTPException(422, str(exc)) from None


def _add_photos(engine: ImageSearchEngine, settings: Settings, product_id: str, photos: list[Upload]) -> dict:
    """Check each photo, copy it from its spooled upload under its own (sanitised) file name, or a name made from
    its content when the client gave none, and add them. A failed write answers 507/503, never 500."""
    try:
        with tempfile.TemporaryDirectory(prefix="lookalike-upload-", ignore_cleanup_errors=True) as tmp:
            out = engine.add_images(product_id, _stage(photos, Path(tmp), settings))
    except ImageError as exc:
        raise HTTPException(image_error_status(exc.reason), f"cannot add the photos: {exc.reason}") from None
    except ValueError as exc:  # InvalidProductIdError included
        raise HTTPException(422, str(exc)) from None
    except write_error_names() as exc:
        raise write_failed(exc, f"add photos to product {product_id!r}") from None
    return {k: out[k] for k in ("product_id", "added", "images", "image_ids")}


def _stage(photos: list[Upload], tmp: Path, settings: Settings) -> list[Path]:
    """Each distinct photo in its own folder under ``tmp`` (two parts may carry the same name), checked and named."""
    paths, seen = [], set()
    for n, photo in enumerate(photos, start=1):
        photo.file.seek(0)
        digest = hashlib.file_digest(photo.file, "sha256").hexdigest()
        if digest in seen:  # the same photo twice in one request is one photo
            continue
        seen.add(digest)
        folder = tmp / str(n)
        folder.mkdir()
        staged = folder / "upload"
        photo.file.seek(0)
        with staged.open("wb") as f:
            shutil.copyfileobj(photo.file, f)
        try:
            fmt = open_image(staged, settings.max_image_pixels).format
        except ImageError as exc:
            raise HTTPException(image_error_status(exc.reason), f"photo {n}: {exc.reason}") from None
        if fmt not in EXTENSIONS:
            raise HTTPException(415, f"photo {n} is {fmt}; catalog photos must be JPEG, PNG or WebP")
        path = folder / safe_file_name(photo.filename, FILE_EXTENSIONS[fmt], digest[:20])
        staged.rename(path)
        paths.append(path)
    return paths
