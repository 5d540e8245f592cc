"""executor: ray gives the vectors local extraction gives, in input order, and keeps each bad image's reason."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lookalike[scale]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'lookalike[scale]')")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

from lookalike.distributed import _collect, extract_with_ray  # noqa: E402
from lookalike.embedding import FeatureExtractor  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_matches_local_extraction_and_keeps_errors(local_ray, make_settings, catalog, tmp_path):
    settings = make_settings()
    paths = sorted(catalog.rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    images = [paths[0], broken, *paths[1:], tmp_path / "missing.jpg", paths[0].read_bytes()]
    local = FeatureExtractor(settings).extract(images)
    remote = extract_with_ray(settings, images)
    assert remote.ok == local.ok and remote.formats == local.formats
    assert remote.errors == local.errors and set(remote.errors) == {1, len(images) - 2}
    a, b = remote.vectors, local.vectors
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert a.shape == b.shape and cos.min() >= 0.9999


def test_collect_refuses_lost_rows():
    batch = {"pos": np.array([1, 0]), "vector": np.ones((2, 3), np.float32), "ok": np.array([True, False]),
             "format": np.array(["JPEG", ""], object), "error": np.array(["", "bad"], object)}  # fmt: skip
    got = _collect([batch], 2)
    assert got.ok == [1] and got.errors == {0: "bad"} and got.formats == ["JPEG"]
    with pytest.raises(RuntimeError, match="lost 1 of 3"):
        _collect([batch], 3)
