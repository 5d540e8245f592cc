"""Quality floors on the whole Grocery Store photo set (../shared/data/grocery), the protocols of its README.

Measured with the defaults (efficientnet_lite0, 256 px, centre-weighted pooling), see docs/quality.md:
photo -> catalog Recall@1 0.605, MAP@R 0.282, product hit@5 0.936 untuned; 0.797 / 0.727 / 0.976 tuned. The seed's
pipeline scored 0.483 / 0.213 / 0.855. The floors sit a little under the measured numbers.
"""

from __future__ import annotations

from typing import Any

import pytest

from lookalike import Settings
from lookalike.evaluation import evaluate

pytestmark = pytest.mark.slow

UNTUNED = {"recall@1": 0.58, "map@r": 0.27, "product_hit@5": 0.92}
TUNED = {"recall@1": 0.775, "map@r": 0.70, "product_hit@5": 0.96}


@pytest.fixture(scope="module")
def results(grocery_dir, tmp_path_factory) -> dict[str, dict[str, Any]]:
    cache = tmp_path_factory.mktemp("grocery-cache")  # shared: the tuned run reuses the extracted features
    out = {}
    for name, tune in (("untuned", False), ("tuned", True)):
        settings = Settings(config_file=None, environ={}, model_name="efficientnet_lite0", cache_dir=cache, tune=tune)
        out[name] = evaluate(
            settings,
            grocery_dir / "catalog",
            grocery_dir / "queries",
            iconic_dir=grocery_dir / "iconic",
            leave_out_products=20 if tune else 0,
        )
    return out


@pytest.fixture(scope="module")
def grocery_dir():
    from conftest import GROCERY

    if not (GROCERY / "catalog").is_dir():
        pytest.skip(f"real product photos not found at {GROCERY} (see ../shared/data/README.md)")
    return GROCERY


def test_defaults_beat_the_seed_pipeline(results):
    metrics = results["untuned"]["protocols"]["photo->catalog"]["metrics"]
    assert metrics["queries"] == 296
    for key, floor in UNTUNED.items():
        assert metrics[key] >= floor, (key, metrics[key])


def test_catalog_tuning_lifts_every_protocol(results):
    tuned, untuned = results["tuned"], results["untuned"]
    assert tuned["tuning"]["status"] == "tuned"
    metrics = tuned["protocols"]["photo->catalog"]["metrics"]
    for key, floor in TUNED.items():
        assert metrics[key] >= floor, (key, metrics[key])
    for protocol in ("leave-one-out", "iconic->photos"):
        assert tuned["protocols"][protocol]["metrics"]["map@r"] > untuned["protocols"][protocol]["metrics"]["map@r"], (
            protocol
        )


def test_not_in_catalog_is_measured_with_twenty_products_left_out(results):
    nm = results["tuned"]["no_match"]
    assert len(nm["hidden_products"]) == 20
    assert nm["in_catalog_queries"] + nm["hidden_product_queries"] == 296
    assert nm["auroc"] >= 0.70  # measured 0.740; the target of 0.90 is not reached (docs/quality.md)
    assert 0 <= nm["wrong_no_match_rate"] <= 1 and 0 <= nm["right_no_match_rate"] <= 1
