"""Which settings were set explicitly, the warning for a mistyped LOOKALIKE_* variable, the settings' descriptions,
and adopt_recorded: an index's recorded build settings replace defaults, and an explicit contradiction is an error."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import pytest

from lookalike import settings as settings_module
from lookalike.settings import RECORDED_SETTINGS, Settings, SettingsError, adopt_recorded, describe_setting


def make(environ=None, **kw) -> Settings:
    return Settings(config_file=None, environ=environ or {}, **kw)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(settings_module, "_warned_env", set())


def test_tuning_and_the_fastest_runtime_are_the_defaults():
    s = make()
    assert s.tune is True and s.runtime == "auto"


# --- explicit vs default ------------------------------------------------------------------------------------------


def test_nothing_is_explicit_by_default():
    assert make().explicit == frozenset()


def test_keywords_environment_and_config_file_are_explicit(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 8\nimg_size: null\n")
    s = Settings(config_file=config, environ={"LOOKALIKE_POOLING": "avg", "LOOKALIKE_THREADS": ""}, tune=False)
    # a null in the file and an empty variable mean "the default": not explicit
    assert s.explicit == {"batch_size", "pooling", "tune"}


def test_an_explicit_value_equal_to_the_default_is_still_explicit():
    assert make(model_name="efficientnet_lite0").explicit == {"model_name"}


def test_replace_marks_its_changes_explicit():
    s = make(pooling="avg").replace(batch_size=3)
    assert s.explicit == {"pooling", "batch_size"}


# --- unknown environment variables --------------------------------------------------------------------------------


def test_mistyped_environment_variable_names_the_closest_setting(caplog):
    with caplog.at_level(logging.WARNING, logger="lookalike.settings"):
        s = make(environ={"LOOKALIKE_MODLE_NAME": "resnet50"})
    assert s.model_name == "efficientnet_lite0"
    messages = [r.getMessage() for r in caplog.records]
    assert any("LOOKALIKE_MODLE_NAME is ignored" in m and "LOOKALIKE_MODEL_NAME" in m for m in messages), messages


def test_unknown_environment_variable_without_a_close_setting(caplog):
    with caplog.at_level(logging.WARNING, logger="lookalike.settings"):
        make(environ={"LOOKALIKE_XYZZY": "1"})
    assert any("LOOKALIKE_XYZZY is ignored: no such setting" in r.getMessage() for r in caplog.records)


def test_known_variables_and_lookalike_config_raise_no_warning(caplog, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="lookalike.settings"):
        make(environ={"LOOKALIKE_CONFIG": str(config), "LOOKALIKE_TUNE": "false", "OTHER_THING": "1"})
    assert not caplog.records


def test_each_unknown_variable_is_warned_about_once(caplog):
    with caplog.at_level(logging.WARNING, logger="lookalike.settings"):
        make(environ={"LOOKALIKE_PORTT": "1"})
        make(environ={"LOOKALIKE_PORTT": "1"})
    assert len([r for r in caplog.records if "LOOKALIKE_PORTT" in r.getMessage()]) == 1


# --- descriptions -------------------------------------------------------------------------------------------------


def test_every_setting_has_a_one_line_description():
    for f in fields(Settings):
        if f.name == "config_file":
            continue
        text = describe_setting(f.name)
        assert f.name in settings_module.DESCRIPTIONS, f.name
        assert text and "\n" not in text and len(text) <= 110, f.name


# --- adopt_recorded -----------------------------------------------------------------------------------------------


def recorded_from(**kw) -> dict:
    """What a build's manifest records: Settings.to_dict() of the build settings."""
    return make(**kw).to_dict()


def test_recorded_values_replace_defaults(tmp_path):
    catalog = tmp_path / "catalog"
    recorded = recorded_from(
        data_dir=catalog,
        model_name="test_tiny",
        img_size=96,
        pooling="avg",
        similarity_metric="l2",
        runtime="openvino",
        precision="int8",
        tune=False,
        index_type="Flat",
        exact_below=50,
    )
    s = adopt_recorded(make(cache_dir=tmp_path / "cache"), recorded)
    assert s.data_dir == catalog and s.data_dir.is_absolute()
    assert (s.model_name, s.img_size, s.pooling, s.similarity_metric) == ("test_tiny", 96, "avg", "l2")
    assert (s.runtime, s.precision, s.tune, s.index_type, s.exact_below) == ("openvino", "int8", False, "Flat", 50)
    assert s.cache_dir == tmp_path / "cache"
    assert s.explicit == {"cache_dir"}  # adopted values are the index's, not the user's


def test_search_from_another_folder_finds_the_catalog(tmp_path, monkeypatch):
    recorded = recorded_from(data_dir=(tmp_path / "shop" / "catalog").resolve())
    monkeypatch.chdir(tmp_path)
    s = adopt_recorded(make(), recorded)
    assert s.data_dir == (tmp_path / "shop" / "catalog").resolve()


def test_nothing_to_adopt_returns_the_same_settings(tmp_path):
    s = make(data_dir=tmp_path)
    assert adopt_recorded(s, s.to_dict()) is s


def test_explicit_contradiction_names_the_setting_both_values_and_the_way_out(tmp_path):
    recorded = recorded_from(runtime="openvino", precision="int8")
    with pytest.raises(SettingsError) as info:
        adopt_recorded(make(precision="fp32"), recorded)
    message = str(info.value)
    assert message.startswith("precision:")
    assert "precision=int8" in message and "precision=fp32" in message
    assert "Leave precision unset" in message and "another cache_dir" in message


@pytest.mark.parametrize(
    ("build", "given", "name"),
    [
        ({"model_name": "test_tiny"}, {"model_name": "efficientnet_lite0"}, "model_name"),
        ({"img_size": 96}, {"img_size": 128}, "img_size"),
        ({"pooling": "avg"}, {"pooling": "center"}, "pooling"),
        ({"similarity_metric": "l2"}, {"similarity_metric": "cosine"}, "similarity_metric"),
        ({"pretrained": False}, {"pretrained": True}, "pretrained"),
        ({"index_type": "Flat"}, {"index_type": "HNSW32"}, "index_type"),
        ({"exact_below": 5}, {"exact_below": 6}, "exact_below"),
        ({"runtime": "openvino", "precision": "int8"}, {"runtime": "onnx"}, "runtime"),
    ],
)
def test_each_recorded_setting_is_checked(build, given, name):
    with pytest.raises(SettingsError, match=rf"^{name}:"):
        adopt_recorded(make(**given), recorded_from(**build))


def test_explicit_data_dir_elsewhere_is_a_contradiction(tmp_path):
    recorded = recorded_from(data_dir=(tmp_path / "a").resolve())
    with pytest.raises(SettingsError, match="^data_dir:"):
        adopt_recorded(make(data_dir=tmp_path / "b"), recorded)
    same = adopt_recorded(make(data_dir=tmp_path / "a"), recorded)  # the same folder, spelled as given
    assert same.data_dir == tmp_path / "a"


def test_relative_recorded_data_dir_is_not_adopted(tmp_path):
    s = adopt_recorded(make(data_dir=tmp_path), {"data_dir": "data"})
    assert s.data_dir == tmp_path


@pytest.mark.parametrize("runtime", ["torch", "onnx", "openvino", "auto"])
def test_fp32_runtime_is_a_matter_of_speed_not_adopted_or_checked(runtime):
    recorded = recorded_from(runtime="torch")
    assert adopt_recorded(make(), recorded).runtime == "auto"  # the fastest, not the build's
    assert adopt_recorded(make(runtime=runtime), recorded).runtime == runtime


def test_int8_adopts_its_runtime():
    s = adopt_recorded(make(), recorded_from(runtime="onnx", precision="int8"))
    assert (s.runtime, s.precision) == ("onnx", "int8")


def test_equivalent_spellings_are_no_contradiction():
    recorded = recorded_from(model_name="efficientnet_lite0", precision="auto")
    s = adopt_recorded(make(img_size=256, embedding_dim=1280, precision="fp32"), recorded)
    assert (s.img_size, s.embedding_dim, s.precision) == (256, 1280, "fp32")


def test_tune_is_kept_unless_set_and_an_explicit_tune_is_never_a_contradiction(caplog):
    untuned = recorded_from(tune=False)
    with caplog.at_level(logging.INFO, logger="lookalike.settings"):
        assert adopt_recorded(make(), untuned).tune is False  # a rebuild keeps the index's choice
    assert any("tune=False: kept" in r.getMessage() for r in caplog.records)
    assert adopt_recorded(make(tune=True), untuned).tune is True
    assert adopt_recorded(make(tune=False), recorded_from(tune=True)).tune is False  # turns tuning off


def test_a_different_model_takes_its_own_embedding_dim():
    s = adopt_recorded(make(), recorded_from(model_name="test_tiny"))
    assert s.model_name == "test_tiny" and s.embedding_dim is None


def test_settings_not_recorded_are_left_alone():
    s = adopt_recorded(make(batch_size=7), {"model_name": "test_tiny", "batch_size": 99, "port": 1})
    assert (s.batch_size, s.port, s.model_name) == (7, 8000, "test_tiny")


def test_recorded_value_this_version_cannot_use_is_named():
    with pytest.raises(SettingsError, match="records settings this version cannot use.*model_name='gone'"):
        adopt_recorded(make(), {"model_name": "gone"})


def test_store_fields_are_checked_when_the_settings_have_them():
    names = {f.name for f in fields(Settings)}
    assert {"store", "milvus_uri", "collection"} <= set(RECORDED_SETTINGS)
    if "store" not in names:  # the store settings arrive with the store work; until then they are skipped
        assert adopt_recorded(make(), {"store": "milvus"}) == make()


def test_the_cli_marks_flags_explicit(tmp_path):
    from lookalike.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["stats", "--cache-dir", str(tmp_path)])
    assert "cache_dir" in settings_from_args(args).explicit
    assert Path(settings_from_args(args).cache_dir) == tmp_path


# --- with the engine: the wiring the engine's load / rebuild is to do ----------------------------------------------


def _opened(settings: Settings) -> Settings:
    """The settings an engine runs with once it has opened the index in ``settings.cache_dir``."""
    from lookalike import ImageSearchEngine

    engine = ImageSearchEngine(settings)
    engine.load_index()
    return engine.settings


def test_an_index_opened_from_another_folder_with_only_its_cache_dir(tmp_path, monkeypatch, catalog):
    from conftest import product_image
    from lookalike import ImageSearchEngine

    monkeypatch.chdir(tmp_path)  # built with a relative data_dir, as `lookalike index --data-dir catalog` does
    built = make(model_name="test_tiny", data_dir="catalog", cache_dir=tmp_path / "cache", pooling="avg", tune=False)
    ImageSearchEngine(built).build_index(progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    opened = _opened(make(cache_dir=tmp_path / "cache"))
    assert (opened.model_name, opened.pooling, opened.tune) == ("test_tiny", "avg", False)
    assert opened.data_dir == catalog.resolve()
    engine = ImageSearchEngine(opened)
    engine.load_index()
    query = tmp_path / "q.jpg"
    product_image(0, 77).save(query)
    hit = engine.search(query, top_k=1)[0]
    assert hit["product_id"] == "red-disc" and Path(hit["image_path"]).is_file()


def test_a_flag_that_contradicts_the_index_is_one_error_before_any_work(tmp_path, catalog):
    from lookalike import ImageSearchEngine

    ImageSearchEngine(make(model_name="test_tiny", data_dir=catalog, cache_dir=tmp_path)).build_index(progress=False)
    from lookalike import IndexMismatchError

    with pytest.raises(IndexMismatchError, match=r"^pooling: .*pooling=center.*pooling=avg"):
        _opened(make(cache_dir=tmp_path, pooling="avg"))


def test_a_rebuild_keeps_the_indexs_tuning_choice(tmp_path, catalog):
    from lookalike import ImageSearchEngine

    ImageSearchEngine(make(model_name="test_tiny", data_dir=catalog, cache_dir=tmp_path, tune=False)).build_index()
    rebuilt = ImageSearchEngine(make(cache_dir=tmp_path))  # a plain `lookalike index` later: tune left unset
    rebuilt.build_index(progress=False)
    assert rebuilt.settings.tune is False
    assert rebuilt.get_statistics()["tuning"] == "off"
    told = ImageSearchEngine(make(cache_dir=tmp_path, tune=True))  # unless told otherwise
    told.build_index(progress=False)
    assert told.settings.tune is True
