"""Reading uploaded photos: a size cap enforced while the body streams in, multipart or raw bytes, and an HTTP status
for every reason an image can be refused."""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from typing import BinaryIO

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


SPOOL_BYTES = 1024 * 1024  # an upload part beyond this is spooled to a temporary file, not held in memory


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the upload is larger than the limit of {limit:,} bytes (max_upload_bytes)")


def _check_declared(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large(limit)


def _limited(request: Request, limit: int) -> Request:
    """A copy of ``request`` whose body stream raises 413 as soon as more than ``limit`` bytes have come in."""
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large(limit)
        return message

    return Request(request.scope, receive)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or actually sent)."""
    _check_declared(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Upload:
    """One uploaded photo: the client's file name (None for a raw body) and its bytes, in memory up to
    ``SPOOL_BYTES`` and in a temporary file beyond."""

    filename: str | None
    file: BinaryIO
    size: int

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()


class Uploads(list):
    """The photos of one request; ``await close()`` frees their temporary files."""

    def __init__(self, items, closer=None):
        super().__init__(items)
        self._closer = closer

    async def close(self) -> None:
        if self._closer is not None:
            await self._closer()
        for up in self:
            up.file.close()


async def receive_uploads(request: Request, limit: int, *, many: bool = False) -> Uploads:
    """The uploaded photo(s), streamed (never the whole body in memory): every file part of a multipart form, or
    the raw body. The caller must ``await uploads.close()``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        envelope = limit + MULTIPART_ENVELOPE
        _check_declared(request, envelope)
        form = await _limited(request, envelope).form(max_files=MAX_FILES, max_fields=MAX_FILES)
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        out = Uploads([Upload(f.filename, f.file, f.size or 0) for f in files], form.close)
        try:
            if not files:
                field = "images" if many else "image"
                raise HTTPException(422, f"the form has no file part: send the photo as a file (field {field!r})")
            if not many and len(files) > 1:
                raise HTTPException(422, f"send one photo per search, not {len(files)}")
            if sum(up.size for up in out) > limit:
                raise too_large(limit)
        except BaseException:
            await out.close()
            raise
    elif media.startswith("image/") or media == "application/octet-stream":
        _check_declared(request, limit)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed by Uploads.close()
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        out = Uploads([Upload(None, spool, size)])
    else:
        shown = media or "none"
        raise HTTPException(
            415,
            f"unsupported Content-Type {shown!r}: send the photo as multipart/form-data (field 'image') "
            "or as the raw request body with Content-Type image/jpeg, image/png or image/webp",
        )
    if any(up.size == 0 for up in out):
        await out.close()
        raise HTTPException(422, "the uploaded photo is empty (0 bytes)")
    return out


async def read_images(request: Request, limit: int, *, many: bool = False) -> list[bytes]:
    """The uploaded photo(s) as bytes (a search needs them decoded anyway; its gate bounds how many at once)."""
    uploads = await receive_uploads(request, limit, many=many)
    try:
        return [up.read() for up in uploads]
    finally:
        await uploads.close()


def safe_file_name(name: str | None, extensions: tuple[str, ...], fallback: str) -> str:
    """A catalog file name from a client's file name: its last path component, NFC, without control, format
    (bidi) or reserved characters, no leading dot, at most 100 bytes before an extension of the decoded format
    (``extensions[0]`` unless the client's extension already is one of them). ``fallback`` when nothing is left."""
    base = re.split(r"[/\\]", unicodedata.normalize("NFC", name or ""))[-1]
    base = "".join(
        "_" if c in '<>:"|?*' else c for c in base if unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn")
    )
    stem, ext = os.path.splitext(base)
    stem = stem.strip(" .")
    if not ext or ext.lower() not in extensions:
        ext = extensions[0]
    stem = stem.encode("utf-8")[:100].decode("utf-8", "ignore").strip(" .")
    return f"{stem or fallback}{ext.lower()}"


def image_error_status(reason: str) -> int:
    """415 for something that is not an image we read, 413 for too many pixels, 422 for a broken image."""
    if reason.startswith("not a supported image"):
        return 415
    if "too large" in reason:
        return 413
    return 422
