"""The default runtime: ``auto`` picks the fastest installed runtime, gives the torch reference vectors, reuses the
exported model without importing torch, and never spin-waits; the server divides the cores between searches."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import product_image
from lookalike import FeatureExtractor, Settings
from lookalike import runtime as rt
from lookalike.runtime import OnnxRunner, OpenVinoRunner

SRC = Path(__file__).resolve().parents[1] / "src"


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def make(cache: Path, **overrides) -> FeatureExtractor:
    values = dict(model_name="test_tiny", cache_dir=cache, batch_size=4, num_workers=0)
    values.update(overrides)
    return FeatureExtractor(Settings(config_file=None, environ={}, **values))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(6):
        path = folder / f"{i}.jpg"
        product_image(i, i).save(path, quality=90)
        paths.append(path)
    return paths


def test_auto_is_the_default_and_picks_openvino_when_installed(tmp_path, photos, caplog):
    assert Settings(config_file=None, environ={}).runtime == "auto"
    with caplog.at_level(logging.INFO, logger="lookalike"):
        ex = make(tmp_path)
    assert ex.runtime == "openvino" and isinstance(ex.runner, OpenVinoRunner)
    assert any("runtime auto: openvino" in r.getMessage() for r in caplog.records)
    assert any("exporting test_tiny" in r.getMessage() for r in caplog.records)  # the first export says so
    reference = make(tmp_path, runtime="torch")
    out, ref = ex.extract(photos).vectors, reference.extract(photos).vectors
    assert cosine(out, ref).min() >= 0.9999
    assert ex.fingerprint == reference.fingerprint  # caches and indexes are shared with torch builds


def test_auto_falls_back_to_onnx_then_torch(monkeypatch):
    monkeypatch.setattr(rt, "installed", lambda module: module == "onnxruntime")
    assert rt.resolve_runtime("auto", "cpu", "fp32") == "onnx"
    assert rt.resolve_runtime("auto", "cpu", "int8") == "onnx"
    assert rt.resolve_runtime("auto", "cpu", "bf16") == "torch"
    monkeypatch.setattr(rt, "installed", lambda module: False)
    assert rt.resolve_runtime("auto", "cpu", "fp32") == "torch"
    with pytest.raises(RuntimeError, match="int8' needs OpenVINO or ONNX Runtime"):
        rt.resolve_runtime("auto", "cpu", "int8")


def test_auto_on_a_gpu_or_in_fp16_is_torch():
    assert rt.resolve_runtime("auto", "cuda", "fp16") == "torch"
    assert rt.resolve_runtime("auto", "cuda:1", "fp32") == "torch"
    assert rt.resolve_runtime("onnx", "cpu", "fp32") == "onnx"


def test_auto_int8_names_the_runtime_it_picked(tmp_path):
    ex = make(tmp_path, precision="int8")
    assert ex.describe()["precision"].endswith("-openvino")


def test_onnx_runtime_threads_do_not_spin(tmp_path):
    ex = make(tmp_path, runtime="onnx")
    assert isinstance(ex.runner, OnnxRunner)
    options = ex.runner.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_openvino_threads_are_not_pinned(tmp_path):
    ex = make(tmp_path, runtime="openvino", threads=1)
    assert ex.runner.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert str(ex.runner.compiled.get_property("TBB_PARTITIONER")).endswith("AUTO")
    assert int(ex.runner.compiled.get_property("INFERENCE_NUM_THREADS")) == 1


_CHILD = """
import json, sys
from lookalike import FeatureExtractor, Settings
s = Settings(config_file=None, environ={}, model_name="test_tiny", cache_dir=sys.argv[1], num_workers=0)
ex = FeatureExtractor(s)
v = ex.extract_features(sys.argv[2])
print(json.dumps({"torch": "torch" in sys.modules, "runtime": ex.runtime, "vector": v.tolist()}))
"""


def _child(cache: Path, photo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env["PYTHONPATH"] = str(SRC)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(cache), str(photo)], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_exported_model_runs_without_importing_torch(tmp_path, photos):
    first = _child(tmp_path, photos[0])  # exports (imports torch)
    assert first["runtime"] == "openvino" and first["torch"] is True
    again = _child(tmp_path, photos[0])  # another process reuses the file
    assert again["torch"] is False
    np.testing.assert_allclose(again["vector"], first["vector"], rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "models").glob("*.onnx"))) == 1


def test_lookalike_sets_a_passive_openmp_wait_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(SRC)
    code = "import os, sys, lookalike; print(os.environ['OMP_WAIT_POLICY'] if 'torch' not in sys.modules else 'late')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "PASSIVE"


@pytest.mark.parametrize(("cores", "slots", "threads"), [(2, 2, 1), (16, 2, 8), (2, 4, 1), (3, 2, 1), (1, 1, 1)])
def test_network_threads_never_ask_for_more_than_the_cores(cores, slots, threads):
    assert rt.network_threads(cores, slots) == threads
    assert slots * threads <= max(cores, slots)


def test_server_settings_size_threads_unless_set(monkeypatch):
    monkeypatch.setattr(rt, "default_threads", lambda: 8)
    base = Settings(config_file=None, environ={}, max_concurrent_searches=4)
    sized = rt.server_settings(base)
    assert sized.threads == 2 and "threads" not in sized.explicit
    explicit = Settings(config_file=None, environ={}, threads=3)
    assert rt.server_settings(explicit).threads == 3


@pytest.mark.slow
def test_auto_gives_the_torch_vectors_of_lite0_on_real_photos(grocery, tmp_path):
    paths = sorted((grocery / "queries").rglob("*.jpg"))[:8]
    base = dict(cache_dir=tmp_path, num_workers=0)
    auto = FeatureExtractor(Settings(config_file=None, environ={}, **base))
    torch_ = FeatureExtractor(Settings(config_file=None, environ={}, runtime="torch", **base))
    assert auto.runtime == "openvino"
    a, b = auto.extract_batch_features(paths), torch_.extract_batch_features(paths)
    assert cosine(a, b).min() >= 0.9999


def test_two_processes_exporting_at_once_both_succeed(tmp_path, photos):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env["PYTHONPATH"] = str(SRC)
    argv = [sys.executable, "-c", _CHILD, str(tmp_path), str(photos[1])]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    vectors = [json.loads(out.strip().splitlines()[-1])["vector"] for out, _ in outs]
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_file())
    assert len(files) == 1 and files[0].endswith("-fp32.onnx"), files  # one model, no temporary files left


def test_openvino_keeps_its_compiled_model_for_the_next_process(tmp_path, photos):
    first = make(tmp_path, runtime="openvino")
    cached = list((tmp_path / "models" / rt.OPENVINO_CACHE).rglob("*.blob"))
    assert cached, "no compiled model cached"
    again = make(tmp_path, runtime="openvino")  # imports the cached blob
    np.testing.assert_allclose(again.extract(photos).vectors, first.extract(photos).vectors, rtol=1e-5, atol=1e-5)


def test_the_server_gives_each_search_its_share_of_the_cores(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from lookalike.server import create_app

    monkeypatch.setattr(rt, "default_threads", lambda: 4)
    settings = Settings(config_file=None, environ={}, cache_dir=tmp_path, max_concurrent_searches=2)
    engine = create_app(settings).state.lookalike.engine
    assert engine.settings.threads == 2  # 2 searches x 2 threads <= 4 cores
    assert engine.settings.max_concurrent_searches * engine.settings.threads <= 4
    given = Settings(config_file=None, environ={}, cache_dir=tmp_path, threads=3)
    assert create_app(given).state.lookalike.engine.settings.threads == 3  # an explicit value is kept
