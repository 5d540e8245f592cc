"""What the HTTP routes share: the engine, the settings, the search gate, the metrics and the load status."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib import resources

from PIL import Image

from ..engine import ImageSearchEngine
from ..settings import Settings
from .gate import SearchGate
from .images import Thumbnails
from .metrics import Metrics

logger = logging.getLogger(__name__)

PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css",
    **{name: "text/javascript" for name in ("app.js", "photo.js", "filters.js", "results.js")},
}


class ServerState:
    """What the routes share: the engine, the settings, the search gate, the metrics and the load status."""

    def __init__(self, engine: ImageSearchEngine, settings: Settings, gate: SearchGate):
        self.engine = engine
        self.settings = settings
        self.gate = gate
        self.metrics = Metrics(self.gauges)
        self.thumbnails = Thumbnails()
        self.status = "ready" if engine.is_ready else "loading"
        self._loader: threading.Thread | None = None
        self.page = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in PAGE_FILES}

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.engine.is_ready

    def start_loading(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Load the index in a background thread, unless it is loaded or being loaded (an app may start twice)."""
        if self.ready or (self._loader is not None and self._loader.is_alive()):
            return
        self.status = "loading"
        self._loader = threading.Thread(target=self.load, args=(on_failure,), name="lookalike-load", daemon=True)
        self._loader.start()

    def load(self, on_failure: Callable[[str], None] | None = None) -> None:
        """Load the index, then run one search so the first real one is not slowed by lazy initialisation."""
        try:
            start = time.perf_counter()
            self.engine.load_index()
            self.engine.search(Image.new("RGB", (64, 64), (128, 128, 128)), top_k=1)
        except Exception as exc:  # any failure: log it in full, say "failed" on /readyz (without paths)
            self.status = "failed"
            logger.error("cannot load the index: %s", exc)
            if on_failure is not None:
                on_failure(f"cannot load the index: {exc}")
            return
        self.status = "ready"
        logger.info("index loaded and warmed up in %.1fs; ready", time.perf_counter() - start)

    def gauges(self):
        gate = self.gate.stats()
        yield "lookalike_index_ready", "1 once the index is loaded and searches are answered.", float(self.ready)
        if self.ready:
            stats = self.engine.get_statistics()
            yield "lookalike_index_images", "Images in the index.", stats["images"]
            yield "lookalike_index_products", "Products in the index.", stats["products"]
            yield "lookalike_index_size_bytes", "Size of the index file.", stats.get("index_size_bytes", 0)
        yield "lookalike_searches_running", "Searches running now.", gate["running"]
        yield "lookalike_searches_waiting", "Searches waiting for a slot.", gate["waiting"]
        yield "lookalike_searches_rejected_total", "Searches refused with 503 (queue full).", gate["rejected"]
        yield "lookalike_search_slots", "max_concurrent_searches.", gate["workers"]
        yield "lookalike_search_queue_size", "search_queue_size.", gate["queue_size"]


__all__ = ["PAGE_FILES", "ServerState"]
