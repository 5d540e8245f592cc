"""HTTP API and web page over an index (the optional ``server`` extra). The library never imports this package.

``create_app(settings, engine=...)`` builds the FastAPI app; ``serve(settings)`` runs it under uvicorn, which is what
``lookalike serve`` does.
"""

from __future__ import annotations

from ..settings import Settings
from .app import create_app


def serve(settings: Settings, *, access_log: bool = True) -> None:
    """Listen on ``settings.host:settings.port`` until interrupted; the index is loaded after the socket is open.

    Raises RuntimeError if the index cannot be loaded (the server stops rather than stay up unable to search).
    """
    import uvicorn

    failures: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    if failures:
        raise RuntimeError(failures[0])


__all__ = ["create_app", "serve"]
