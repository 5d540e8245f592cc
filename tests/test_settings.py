"""Settings: the precedence chain, derived values and every validation message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lookalike import Settings, SettingsError
from lookalike.backbones import available_backbones
from lookalike.settings import settings_fields

REPO = Path(__file__).resolve().parents[1]


def settings(**kw) -> Settings:
    """No YAML and no environment unless the test asks for them."""
    kw.setdefault("config_file", None)
    kw.setdefault("environ", {})
    return Settings(**kw)


@pytest.fixture
def write_yaml(tmp_path: Path):
    def write(text: str, name: str = "settings.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


# --- precedence -------------------------------------------------------------------------------------------


def test_defaults_without_yaml_or_environment():
    s = settings()
    assert s.device == "cpu"
    assert s.img_size is None
    assert s.batch_size == 32
    assert s.embedding_dim is None
    assert s.model_name == "efficientnet_lite0"
    assert s.similarity_metric == "cosine"
    assert s.data_dir == Path("data")
    assert s.cache_dir == Path("cache")
    assert s.weights_path is None
    assert s.pretrained is True
    assert s.num_workers == 2
    assert s.max_image_pixels == 40_000_000
    assert s.config_file is None


def test_each_layer_overrides_the_one_before(write_yaml):
    path = write_yaml("batch_size: 16\nnum_workers: 3\nimg_size: 128\nsimilarity_metric: l2\n")
    env = {"LOOKALIKE_BATCH_SIZE": "8", "LOOKALIKE_NUM_WORKERS": "1"}

    from_yaml = Settings(config_file=path, environ={})
    assert (from_yaml.batch_size, from_yaml.num_workers, from_yaml.img_size) == (16, 3, 128)
    assert from_yaml.similarity_metric == "l2"
    assert from_yaml.device == "cpu"  # not in the file: the default
    assert from_yaml.config_file == path

    from_env = Settings(config_file=path, environ=env)
    assert (from_env.batch_size, from_env.num_workers, from_env.img_size) == (8, 1, 128)

    from_kw = Settings(config_file=path, environ=env, batch_size=2)
    assert (from_kw.batch_size, from_kw.num_workers, from_kw.img_size) == (2, 1, 128)
    assert from_kw.similarity_metric == "l2"


def test_environment_overrides_defaults_without_yaml():
    s = settings(
        environ={
            "LOOKALIKE_BATCH_SIZE": "8",
            "LOOKALIKE_MODEL_NAME": "resnet50",
            "LOOKALIKE_DATA_DIR": "/srv/catalog",
            "LOOKALIKE_PRETRAINED": "false",
            "LOOKALIKE_SIMILARITY_METRIC": "L2",
        }
    )
    assert s.batch_size == 8
    assert s.model_name == "resnet50"
    assert s.data_dir == Path("/srv/catalog")
    assert s.pretrained is False
    assert s.similarity_metric == "l2"


def test_empty_environment_variable_does_not_override(write_yaml):
    path = write_yaml("batch_size: 16\n")
    assert Settings(config_file=path, environ={"LOOKALIKE_BATCH_SIZE": ""}).batch_size == 16


def test_keyword_none_keeps_the_lower_layer_for_ordinary_settings(write_yaml):
    path = write_yaml("batch_size: 16\n")
    assert Settings(config_file=path, environ={}, batch_size=None).batch_size == 16


def test_environment_auto_resets_img_size_from_yaml(write_yaml):
    path = write_yaml("img_size: 128\n")
    s = Settings(config_file=path, environ={"LOOKALIKE_IMG_SIZE": "auto"})
    assert s.img_size is None
    assert s.input_size == 256  # efficientnet_lite0's own default


def test_lookalike_config_in_environ_selects_the_yaml(write_yaml):
    path = write_yaml("batch_size: 7\n", name="chosen.yaml")
    s = Settings(environ={"LOOKALIKE_CONFIG": str(path)})
    assert s.batch_size == 7
    assert s.config_file == path


def test_explicit_config_file_beats_lookalike_config(write_yaml):
    chosen = write_yaml("batch_size: 7\n", name="chosen.yaml")
    other = write_yaml("batch_size: 9\n", name="other.yaml")
    assert Settings(config_file=chosen, environ={"LOOKALIKE_CONFIG": str(other)}).batch_size == 7
    # config_file=None reads no file at all, whatever LOOKALIKE_CONFIG says
    none = Settings(config_file=None, environ={"LOOKALIKE_CONFIG": str(other)})
    assert none.batch_size == 32
    assert none.config_file is None


def test_default_config_is_configs_yaml_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings(environ={}).config_file is None  # none there: defaults only
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "configs.yaml").write_text("batch_size: 5\n")
    s = Settings(environ={})
    assert s.batch_size == 5
    assert s.config_file == Path("configs/configs.yaml")


def test_lookalike_config_pointing_nowhere_is_an_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SettingsError, match="cannot read config file") as info:
        Settings(environ={"LOOKALIKE_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_nulls_in_yaml_mean_default(write_yaml):
    path = write_yaml(
        "batch_size: null\nimg_size: null\nmodel_name: null\nindex_file: null\nweights_path: null\npretrained: null\n"
    )
    s = Settings(config_file=path, environ={})
    assert s == settings()
    assert s.config_file == path


def test_empty_yaml_means_all_defaults(write_yaml):
    assert Settings(config_file=write_yaml(""), environ={}) == settings()


def test_repository_config_sets_nothing_and_documents_every_setting():
    """configs/configs.yaml is read by everything run from the repository (make demo/eval/load): it must not pin
    values (they would count as set explicitly and override the defaults and the index's recorded settings)."""
    path = REPO / "configs" / "configs.yaml"
    text = path.read_text(encoding="utf-8")
    assert yaml.safe_load(text) is None  # every line commented out
    s = Settings(config_file=path, environ={})
    assert s.config_file == path and s.explicit == frozenset() and s == settings()
    lines = [line.removeprefix("# ") for line in text.splitlines() if re.match(r"^# [a-z_]+: ", line)]
    uncommented = yaml.safe_load("\n".join(lines))
    for f in settings_fields():
        assert f.name in uncommented, f"configs/configs.yaml does not mention {f.name}"
    assert s.model_name in available_backbones()


# --- replace and derived values ---------------------------------------------------------------------------


def test_replace_applies_changes_and_keeps_the_rest():
    s = settings(batch_size=8, cache_dir="/tmp/x")
    r = s.replace(num_workers=0, img_size=96)
    assert (r.batch_size, r.num_workers, r.img_size, r.cache_dir) == (8, 0, 96, Path("/tmp/x"))
    assert (s.num_workers, s.img_size) == (2, None)  # the original is unchanged
    assert r != s
    assert r.replace(num_workers=2, img_size=None) == s


def test_replace_validates():
    s = settings()
    with pytest.raises(SettingsError, match="batch_size=0"):
        s.replace(batch_size=0)
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        s.replace(colour="red")


def test_replace_does_not_read_environment_or_yaml_again(write_yaml, monkeypatch):
    path = write_yaml("num_workers: 3\n")
    s = Settings(config_file=path, environ={"LOOKALIKE_BATCH_SIZE": "8"})
    path.write_text("num_workers: 5\n")
    monkeypatch.setenv("LOOKALIKE_BATCH_SIZE", "99")
    r = s.replace(img_size=64)
    assert (r.batch_size, r.num_workers, r.img_size) == (8, 3, 64)


@pytest.mark.parametrize(
    "model, size", [("efficientnet_lite0", 256), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
)
def test_input_size_follows_the_model(model, size):
    assert settings(model_name=model).input_size == size


def test_input_size_is_img_size_when_set():
    assert settings(model_name="test_tiny").input_size == 64
    assert settings(model_name="test_tiny", img_size=100).input_size == 100
    assert settings(img_size="300").input_size == 300


def test_index_and_metadata_paths_follow_cache_dir(tmp_path):
    s = settings(cache_dir=tmp_path / "c")
    assert s.index_path == tmp_path / "c" / "index.faiss"
    assert s.metadata_path == tmp_path / "c" / "metadata.json"
    moved = s.replace(cache_dir=tmp_path / "d")
    assert moved.index_path == tmp_path / "d" / "index.faiss"
    assert moved.metadata_path == tmp_path / "d" / "metadata.json"


def test_explicit_index_and_metadata_files_win(tmp_path):
    s = settings(cache_dir=tmp_path / "c", index_file=tmp_path / "i.faiss", metadata_file=tmp_path / "m.json")
    assert s.index_path == tmp_path / "i.faiss"
    assert s.metadata_path == tmp_path / "m.json"


def test_keyword_none_resets_a_nullable_setting_from_yaml(write_yaml, tmp_path):
    path = write_yaml(f"index_file: {tmp_path / 'i.faiss'}\n")
    assert Settings(config_file=path, environ={}).index_path == tmp_path / "i.faiss"
    s = Settings(config_file=path, environ={}, index_file=None, cache_dir=tmp_path / "c")
    assert s.index_path == tmp_path / "c" / "index.faiss"


def test_to_dict_is_json_ready():
    s = settings(cache_dir="/tmp/x", weights_path="/tmp/w.pth")
    d = json.loads(json.dumps(s.to_dict()))
    assert d["cache_dir"] == "/tmp/x"
    assert d["weights_path"] == "/tmp/w.pth"
    assert d["batch_size"] == 32
    assert d["index_file"] is None
    assert "config_file" not in d


def test_to_dict_records_an_absolute_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert settings(data_dir="catalog").to_dict()["data_dir"] == str(tmp_path.resolve() / "catalog")


def test_equal_settings_compare_equal_whatever_their_source(write_yaml):
    path = write_yaml("batch_size: 8\n")
    assert Settings(config_file=path, environ={}) == settings(batch_size=8)


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("device", "gpu", "cpu, cuda, cuda:<n> or auto"),
        ("device", "cuda:x", "cpu, cuda, cuda:<n> or auto"),
        ("img_size", 16, "integer from 32 to 2048"),
        ("img_size", 4096, "integer from 32 to 2048"),
        ("img_size", "big", "integer from 32 to 2048"),
        ("img_size", 224.5, "integer from 32 to 2048"),
        ("batch_size", 0, "integer from 1 to 4096"),
        ("batch_size", "-3", "integer from 1 to 4096"),
        ("batch_size", True, "integer from 1 to 4096"),
        ("num_workers", -1, "integer from 0 to 64"),
        ("num_workers", 65, "integer from 0 to 64"),
        ("max_image_pixels", 0, "integer from 1 to 1000000000"),
        ("max_image_pixels", "lots", "integer from 1 to 1000000000"),
        ("embedding_dim", 0, "integer from 1 to 65536"),
        ("similarity_metric", "dot", "cosine, l2"),
        ("pretrained", "maybe", "true or false"),
        ("data_dir", "", "file system path"),
        ("cache_dir", 5, "file system path"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(key, value, allowed):
    with pytest.raises(SettingsError) as info:
        settings(**{key: value})
    message = str(info.value)
    assert f"{key}=" in message
    assert repr(value) in message
    assert allowed in message
    assert isinstance(info.value, ValueError)


def test_bad_model_name_lists_the_known_models():
    with pytest.raises(SettingsError) as info:
        settings(model_name="vgg16")
    message = str(info.value)
    assert "model_name='vgg16'" in message
    for name in available_backbones():
        assert name in message
    assert {"resnet50", "efficientnet_b0", "efficientnet_lite0", "test_tiny"} <= set(available_backbones())


def test_bad_value_from_environment_names_it():
    with pytest.raises(SettingsError, match=r"batch_size='eight' is not allowed"):
        settings(environ={"LOOKALIKE_BATCH_SIZE": "eight"})


def test_bad_value_from_yaml_names_it(write_yaml):
    with pytest.raises(SettingsError, match=r"num_workers=-2 is not allowed: expected an integer from 0 to 64"):
        Settings(config_file=write_yaml("num_workers: -2\n"), environ={})


@pytest.mark.parametrize("device, expected", [("CPU", "cpu"), ("auto", "auto"), ("cuda", "cuda"), ("CUDA:1", "cuda:1")])
def test_device_is_normalised(device, expected):
    assert settings(device=device).device == expected


def test_numbers_are_parsed_from_strings():
    s = settings(img_size="96", batch_size=" 8 ", num_workers="0", max_image_pixels="1000", embedding_dim="1280")
    assert (s.img_size, s.batch_size, s.num_workers, s.max_image_pixels, s.embedding_dim) == (96, 8, 0, 1000, 1280)
    assert settings(batch_size=8.0).batch_size == 8


def test_embedding_dim_must_agree_with_the_model():
    with pytest.raises(SettingsError) as info:
        settings(model_name="efficientnet_lite0", embedding_dim=2048)
    message = str(info.value)
    assert "embedding_dim=2048" in message
    assert "efficientnet_lite0" in message
    assert "1280" in message


@pytest.mark.parametrize("model, dim", [("efficientnet_lite0", 1280), ("resnet50", 2048), ("test_tiny", 64)])
def test_embedding_dim_that_agrees_is_accepted(model, dim):
    assert settings(model_name=model, embedding_dim=dim).embedding_dim == dim


def test_embedding_dim_is_checked_against_the_model_of_a_higher_layer(write_yaml):
    path = write_yaml("model_name: resnet50\nembedding_dim: 2048\n")
    assert Settings(config_file=path, environ={}).embedding_dim == 2048
    with pytest.raises(SettingsError, match="embedding_dim=2048 is not allowed with model_name='test_tiny'"):
        Settings(config_file=path, environ={"LOOKALIKE_MODEL_NAME": "test_tiny"})


@pytest.mark.parametrize("value", ["none", "null", "auto", ""])
def test_embedding_dim_unset_spellings(value):
    assert settings(embedding_dim=value).embedding_dim is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("on", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
        ("0", False),
        (" no ", False),
    ],
)
def test_pretrained_is_parsed_from_strings(text, expected):
    assert settings(pretrained=text).pretrained is expected
    assert settings(environ={"LOOKALIKE_PRETRAINED": text}).pretrained is expected


def test_paths_expand_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings(data_dir="~/catalog").data_dir == tmp_path / "catalog"


def test_unknown_keyword_is_refused_with_the_known_settings():
    with pytest.raises(SettingsError) as info:
        settings(batchsize=8)
    message = str(info.value)
    assert "unknown setting 'batchsize'" in message
    assert "batch_size" in message and "model_name" in message


def test_unknown_key_in_yaml_names_it_and_the_file(write_yaml):
    path = write_yaml("batch_size: 8\nbatchsize: 8\n")
    with pytest.raises(SettingsError) as info:
        Settings(config_file=path, environ={})
    message = str(info.value)
    assert "unknown setting 'batchsize'" in message
    assert str(path) in message
    assert "batch_size" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_yaml_that_is_not_a_mapping_is_refused(write_yaml, text, kind):
    path = write_yaml(text)
    with pytest.raises(SettingsError) as info:
        Settings(config_file=path, environ={})
    message = str(info.value)
    assert str(path) in message
    assert "must hold a mapping" in message
    assert kind in message


def test_invalid_yaml_is_refused(write_yaml):
    path = write_yaml("batch_size: [8\n")
    with pytest.raises(SettingsError) as info:
        Settings(config_file=path, environ={})
    assert f"config file {path} is not valid YAML" in str(info.value)


def test_missing_config_file_is_refused(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(SettingsError) as info:
        Settings(config_file=path, environ={})
    message = str(info.value)
    assert f"cannot read config file {path}" in message
    assert "No such file" in message


def test_config_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="cannot read config file"):
        Settings(config_file=tmp_path, environ={})
