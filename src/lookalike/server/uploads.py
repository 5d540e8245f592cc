"""Reading uploaded photos: a size cap enforced while the body streams in, multipart or raw bytes, and an HTTP status
for every reason an image can be refused."""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

MULTIPART_ENVELOPE = 64 * 1024  # boundaries and part headers around the photo(s)
MAX_FILES = 20  # photos in one admin upload

# The request body the endpoints accept, for the OpenAPI description (parsed by hand, so both forms work).
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The photo: a multipart/form-data file part (field `image`), or the raw bytes as the body.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "required": ["image"],
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "description": f"Photos of the product (JPEG, PNG or WebP): up to {MAX_FILES} multipart file parts (field "
        "`images`), or one photo as the raw body. The whole request counts against max_upload_bytes.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["images"],
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the upload is larger than the limit of {limit:,} bytes (max_upload_bytes)")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or actually sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, limit: int, *, many: bool = False) -> list[bytes]:
    """The uploaded photo(s) as bytes: every file part of a multipart form, or the raw body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        body = await read_body(request, limit + MULTIPART_ENVELOPE)
        form = await _replay(request, body).form(max_files=MAX_FILES, max_fields=MAX_FILES)
        try:
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if not files:
                field = "images" if many else "image"
                raise HTTPException(422, f"the form has no file part: send the photo as a file (field {field!r})")
            if not many and len(files) > 1:
                raise HTTPException(422, f"send one photo per search, not {len(files)}")
            out = [await f.read() for f in files]
        finally:
            await form.close()
        if sum(map(len, out)) > limit:
            raise too_large(limit)
    elif media.startswith("image/") or media == "application/octet-stream":
        out = [await read_body(request, limit)]
    else:
        shown = media or "none"
        raise HTTPException(
            415,
            f"unsupported Content-Type {shown!r}: send the photo as multipart/form-data (field 'image') "
            "or as the raw request body with Content-Type image/jpeg, image/png or image/webp",
        )
    for data in out:
        if not data:
            raise HTTPException(422, "the uploaded photo is empty (0 bytes)")
    return out


def image_error_status(reason: str) -> int:
    """415 for something that is not an image we read, 413 for too many pixels, 422 for a broken image."""
    if reason.startswith("not a supported image"):
        return 415
    if "too large" in reason:
        return 413
    return 422


def _replay(request: Request, body: bytes) -> Request:
    """A copy of ``request`` whose body is ``body`` (already read, within the limit), for the form parser."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(request.scope, receive)
