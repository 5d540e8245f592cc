"""What every route needs to answer: the shared state, "not ready" as 503, and results fit for the wire (no file
paths of the server, the image URLs a client fetches)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from .state import ServerState


def server_state(request: Request) -> ServerState:
    """The app's :class:`ServerState` (a dependency for routers: state is never a module global)."""
    return request.app.state.lookalike


def require_ready(state: ServerState) -> None:
    if not state.ready:
        why = "failed to load (see the server log)" if state.status == "failed" else "is still loading"
        raise HTTPException(503, f"not ready: the index {why}", headers={"Retry-After": "5"})


def wire_hit(request: Request, engine, h: dict[str, Any], thumbnail_size: int) -> dict[str, Any]:
    """A result for the wire: the engine's keys (extra ones too), no file paths, the image's URLs. The product
    ``record`` is the shop's own data and passes as it is."""
    root = Path(engine.settings.data_dir).expanduser().resolve()
    out = {k: v if k == "record" else scrub_paths(v, root) for k, v in h.items() if not k.endswith("_path")}
    url = f"{request.scope.get('root_path', '')}/images/{h['image_id']}"
    return {**out, "image_url": url, "thumbnail_url": f"{url}?size={thumbnail_size}"}


def scrub_paths(value: Any, root: Path) -> Any:
    """Statistics name files by path; answer with catalog-relative names, and only the file name for anything else."""
    if isinstance(value, dict):
        return {k: scrub_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    return value


__all__ = ["require_ready", "scrub_paths", "server_state", "wire_hit"]
