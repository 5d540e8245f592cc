"""Prometheus metrics in the text exposition format, without a client library: request counts and latencies by
route template (never by raw path, so a scanner cannot blow up the label set), plus gauges the app reads live."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


class Metrics:
    """Counters and histograms filled by :class:`MetricsMiddleware`; ``gauges`` is read when /metrics is scraped."""

    def __init__(self, gauges: Callable[[], Iterable[tuple[str, str, float]]] = lambda: ()):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._latency: dict[str, Histogram] = defaultdict(Histogram)
        self._search: dict[str, Histogram] = defaultdict(Histogram)  # queue wait / model run
        self.gauges = gauges
        self.started = time.time()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "OTHER"
        with self._lock:
            self._requests[(method, route, str(status))] += 1
            self._latency[route].observe(seconds)

    def observe_search(self, waited: float, ran: float) -> None:
        with self._lock:
            self._search["queue"].observe(waited)
            self._search["run"].observe(ran)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            _header(lines, "lookalike_http_requests_total", "counter", "HTTP requests by method, route and status.")
            for (method, route, status), n in sorted(self._requests.items()):
                lines.append(f"lookalike_http_requests_total{_labels(method=method, route=route, status=status)} {n}")
            _header(
                lines, "lookalike_http_request_duration_seconds", "histogram", "Time to answer a request, by route."
            )
            for route, h in sorted(self._latency.items()):
                _histogram(lines, "lookalike_http_request_duration_seconds", h, route=route)
            _header(
                lines,
                "lookalike_search_duration_seconds",
                "histogram",
                "Search time by phase: queue (waiting for a slot) and run (decoding, model, index).",
            )
            for phase, h in sorted(self._search.items()):
                _histogram(lines, "lookalike_search_duration_seconds", h, phase=phase)
        for name, help_text, value in self.gauges():
            kind = "counter" if name.endswith("_total") else "gauge"
            _header(lines, name, kind, help_text)
            lines.append(f"{name} {_number(value)}")
        _header(lines, "lookalike_process_start_time_seconds", "gauge", "When the server started (Unix time).")
        lines.append(f"lookalike_process_start_time_seconds {_number(self.started)}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware: times every HTTP request and counts it under the route template that answered it."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope.get("method", ""), route, status, time.perf_counter() - start)


def _header(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")


def _histogram(lines: list[str], name: str, h: Histogram, **labels: str) -> None:
    cumulative = 0
    for bound, n in zip((*BUCKETS, float("inf")), h.counts):
        cumulative += n
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f"{name}_bucket{_labels(**labels, le=le)} {cumulative}")
    lines.append(f"{name}_sum{_labels(**labels)} {_number(h.total)}")
    lines.append(f"{name}_count{_labels(**labels)} {cumulative}")


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
