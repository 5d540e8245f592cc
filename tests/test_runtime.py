"""Runtimes: ONNX Runtime and OpenVINO give the vectors PyTorch gives (fp32), INT8 stays close, exported models are
kept and reused, and the settings that choose them are validated. No timings here (benchmarks/ has those)."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from conftest import product_image
from lookalike import FeatureExtractor, Settings, SettingsError
from lookalike.runtime import CALIBRATION_VERSION, OnnxRunner, OpenVinoRunner, TorchRunner, calibration_pixels

DIM = 64
pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(6):
        path = folder / f"{i}.jpg"
        product_image(i, i).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """One cache folder for the module, so the test model is exported and quantized once."""
    return tmp_path_factory.mktemp("cache")


def make(models: Path, **overrides) -> FeatureExtractor:
    values = dict(model_name="test_tiny", cache_dir=models, batch_size=4, num_workers=0)
    values.update(overrides)
    return FeatureExtractor(Settings(config_file=None, environ={}, **values))


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_fp32_runtimes_give_the_torch_vectors(models, photos, runtime):
    reference = make(models, runtime="torch").extract(photos).vectors
    ex = make(models, runtime=runtime)
    assert isinstance(ex.runner, OnnxRunner if runtime == "onnx" else OpenVinoRunner)
    out = ex.extract(photos).vectors
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    # Same vectors, same identity: caches and indexes are shared with the torch runtime.
    assert ex.fingerprint == make(models, runtime="torch").fingerprint


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_int8_is_close_to_fp32_and_has_its_own_identity(models, photos, runtime):
    fp32 = make(models).extract(photos).vectors
    ex = make(models, runtime=runtime, precision="int8")
    out = ex.extract(photos).vectors
    assert out.shape == fp32.shape and np.isfinite(out).all()
    assert cosine(out[:, :DIM], fp32[:, :DIM]).min() > 0.95
    assert ex.describe()["precision"] == f"int8-{CALIBRATION_VERSION}-{runtime}"
    assert ex.fingerprint != make(models).fingerprint
    other = "openvino" if runtime == "onnx" else "onnx"
    assert ex.fingerprint != make(models, runtime=other, precision="int8").fingerprint


def test_batches_of_any_size_run(models, photos):
    ex = make(models, runtime="openvino", batch_size=5)
    one = np.stack([ex.extract_features(p) for p in photos])
    np.testing.assert_allclose(ex.extract_batch_features(photos), one, rtol=1e-4, atol=1e-5)


def test_large_batches_are_split_over_streams_with_the_same_vectors(models, photos):
    many = photos * 3  # 18 images: split over throughput streams
    batched = make(models, runtime="openvino", batch_size=18)
    out = batched.extract_batch_features(many)
    assert batched.runner._streams is not None
    single = make(models, runtime="openvino", batch_size=1).extract_batch_features(many)
    np.testing.assert_allclose(out, single, rtol=1e-4, atol=1e-5)


def test_a_query_on_a_busy_machine_runs_on_one_thread_with_the_same_vectors(models, photos, monkeypatch):
    import lookalike.runtime as rt

    quiet = make(models, runtime="openvino", batch_size=1)
    reference = quiet.extract_batch_features(photos)
    monkeypatch.setattr(rt, "default_threads", lambda: 2)  # the decision is only made with more than one core
    monkeypatch.setattr(rt, "cores_taken", lambda cores: True)  # other work holds every core
    busy = make(models, runtime="openvino", batch_size=1)
    np.testing.assert_allclose(busy.extract_batch_features(photos), reference, rtol=1e-4, atol=1e-5)
    assert busy.runner._solo is not None  # the one-thread model answered
    fixed = make(models, runtime="openvino", batch_size=1, threads=2)  # an explicit thread count is kept
    np.testing.assert_allclose(fixed.extract_batch_features(photos), reference, rtol=1e-4, atol=1e-5)
    assert fixed.runner._solo is None
    monkeypatch.setattr(rt, "cores_taken", lambda cores: False)
    idle = make(models, runtime="openvino", batch_size=1)
    idle.extract_batch_features(photos)
    assert idle.runner._solo is None


def test_cores_taken_reads_the_running_tasks(monkeypatch, tmp_path):
    import builtins

    import lookalike.runtime as rt

    fake = tmp_path / "loadavg"
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(fake if path == "/proc/loadavg" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    fake.write_text("3.10 2.20 1.00 3/412 9999\n")
    assert rt.cores_taken(2) and not rt.cores_taken(4)
    fake.write_text("0.10 0.20 0.30 1/412 9999\n")
    assert not rt.cores_taken(2)
    fake.write_text("garbled")
    assert not rt.cores_taken(2)  # unknown: keep every thread


def test_exported_model_is_kept_and_reused(tmp_path, photos):
    first = make(tmp_path, runtime="onnx")
    files = sorted((tmp_path / "models").glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith("test_tiny-") and files[0].name.endswith("-fp32.onnx")
    stamp = files[0].stat().st_mtime_ns
    second = make(tmp_path, runtime="openvino")  # the same ONNX file serves OpenVINO
    assert files[0].stat().st_mtime_ns == stamp
    np.testing.assert_allclose(first.extract(photos).vectors, second.extract(photos).vectors, rtol=1e-4, atol=1e-4)


def test_a_damaged_model_file_is_exported_again(tmp_path, photos):
    make(tmp_path, runtime="onnx")
    (path,) = (tmp_path / "models").glob("*.onnx")
    path.write_bytes(b"not a model")
    ex = make(tmp_path, runtime="onnx")
    assert path.stat().st_size > 1000
    assert ex.extract(photos).vectors.shape == (len(photos), 96)


def test_other_sizes_and_models_get_other_files(tmp_path):
    make(tmp_path, runtime="onnx")
    make(tmp_path, runtime="onnx", img_size=96)
    make(tmp_path, runtime="onnx", pooling="avg")
    assert len(list((tmp_path / "models").glob("*.onnx"))) == 3


def test_missing_runtime_package_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'", name="openvino")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(
        RuntimeError, match=r"runtime=.openvino. at fp32 needs openvino, which is missing: pip install openvino"
    ):
        make(tmp_path, runtime="openvino")


def test_torch_runtime_with_threads_and_bf16(models, photos):
    import torch

    before = torch.get_num_threads()
    try:
        ex = make(models, runtime="torch", threads=1)
        assert isinstance(ex.runner, TorchRunner) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    bf16 = make(models, runtime="torch", precision="bf16")
    assert bf16.describe()["precision"] == "bf16"
    reference = make(models, runtime="torch").extract(photos).vectors
    assert cosine(bf16.extract(photos).vectors, reference).min() > 0.98


def test_calibration_photos_are_fixed():
    a = calibration_pixels(32, 2)
    assert a.dtype == np.uint8 and a.shape[1:] == (32, 32, 3) and len(a) >= 40
    np.testing.assert_array_equal(a, calibration_pixels(32, 2))


# --- settings ----------------------------------------------------------------------------------------------


def settings(**kw) -> Settings:
    return Settings(config_file=None, environ={}, **kw)


def test_runtime_settings_defaults_and_environment():
    s = settings()
    assert (s.runtime, s.precision, s.threads) == ("auto", "auto", None)
    s = Settings(
        config_file=None,
        environ={"LOOKALIKE_RUNTIME": "OpenVINO", "LOOKALIKE_PRECISION": "int8", "LOOKALIKE_THREADS": "2"},
    )
    assert (s.runtime, s.precision, s.threads) == ("openvino", "int8", 2)
    assert settings(threads="auto").threads is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"runtime": "tensorrt"}, "runtime='tensorrt' is not allowed: expected one of auto, torch, onnx, openvino"),
        ({"precision": "int4"}, "precision='int4' is not allowed: expected one of"),
        ({"runtime": "torch", "precision": "int8"}, "precision='int8' is not allowed with runtime='torch'"),
        ({"runtime": "onnx", "precision": "bf16"}, "precision='bf16' is not allowed with runtime='onnx'"),
        ({"precision": "fp16"}, "precision='fp16' is not allowed with device='cpu'"),
        ({"runtime": "openvino", "device": "cuda"}, "runtime='openvino' is not allowed with device='cuda'"),
        ({"threads": 0}, "threads=0 is not allowed: expected an integer from 1 to 1024"),
    ],
)
def test_bad_runtime_settings_are_refused(overrides, message):
    with pytest.raises(SettingsError) as info:
        settings(**overrides)
    assert message in str(info.value)


# --- real weights ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lite0_runtimes_on_real_photos(grocery, tmp_path):
    photos = sorted((grocery / "queries").glob("*/*.jpg"))[::30][:10]
    values = dict(model_name="efficientnet_lite0", cache_dir=tmp_path, num_workers=0)
    reference = FeatureExtractor(Settings(config_file=None, environ={}, **values)).extract(photos).vectors
    cases = [("onnx", "fp32", 0.99999), ("openvino", "fp32", 0.99999), ("openvino", "int8", 0.97)]
    for runtime, precision, floor in cases:
        ex = FeatureExtractor(Settings(config_file=None, environ={}, runtime=runtime, precision=precision, **values))
        assert cosine(ex.extract(photos).vectors[:, :1280], reference[:, :1280]).min() > floor, (runtime, precision)
