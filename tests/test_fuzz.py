"""Schema-driven fuzzing: schemathesis generates requests from the app's own OpenAPI description (paths, query
parameters, multipart and raw bodies, headers) and no answer may be a 5xx.

Bounded twice: a fixed number of examples per operation, derandomized (the same requests every run), and a time
budget after which the remaining examples are passed without a request.
"""

from __future__ import annotations

import time
import warnings

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from lookalike import ImageSearchEngine
from lookalike.server import create_app

EXAMPLES_PER_OPERATION = 60
BUDGET_S = 90.0
TOKEN = "fuzz-admin-token-0123456789"
_clock: dict[str, float] = {}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from conftest import PRODUCTS, write_catalog
    from lookalike import Settings

    root = tmp_path_factory.mktemp("fuzz")
    write_catalog(root / "catalog", PRODUCTS)
    settings = Settings(
        config_file=None,
        environ={},
        model_name="test_tiny",
        data_dir=root / "catalog",
        cache_dir=root / "cache",
        batch_size=4,
        admin_token=TOKEN,
        max_upload_bytes=200_000,
    )
    engine = ImageSearchEngine(settings)
    engine.build_index()
    app = create_app(engine=engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.lookalike.gate.shutdown()


OPERATIONS = [
    ("POST", "/search"),
    ("GET", "/products/{product_id}/similar"),
    ("GET", "/images/{image_id}"),
    ("POST", "/products/{product_id}/images"),
    ("DELETE", "/products/{product_id}"),
    ("GET", "/stats"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/search/regions"),
    ("GET", "/facets"),
]


def test_every_operation_of_the_schema_is_fuzzed(api):
    found = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert found == set(OPERATIONS)


NO_PARAMETERS = {"/stats", "/healthz", "/readyz", "/metrics", "/facets"}  # nothing to break, so no negative examples
CASES = [
    (method, path, mode)
    for mode in GenerationMode
    for method, path in OPERATIONS
    if mode is GenerationMode.POSITIVE or path not in NO_PARAMETERS
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m.value} {o} {p}" for o, p, m in CASES])
def test_no_request_makes_the_server_fail(api, method, path, mode):
    """Positive: requests the schema allows; negative: requests that break it (wrong types, missing parts)."""
    operation = api[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        start = _clock.setdefault("start", time.monotonic())
        if time.monotonic() - start > BUDGET_S:
            return  # the run's time budget is spent; what was generated until then has passed
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
            # With the real token, catalog changes are fuzzed too (the token rules have their own tests).
            response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
        calls.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        assert "Traceback" not in response.text

    fuzz()
    assert calls, "no request was made"
    print(f"{mode.value} {method} {path}: {len(calls)} requests, statuses {sorted(set(calls))}")
