"""The build-time settings an index records, and how a later run adopts them (:func:`adopt_recorded`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import Settings, SettingsError

logger = logging.getLogger("lookalike.settings")  # the name these messages have always had

# Build-time values that decide the vectors or the catalog an index holds, in the order they are checked.
RECORDED_SETTINGS = (
    "data_dir",
    "model_name",
    "weights_path",
    "pretrained",
    "img_size",
    "embedding_dim",
    "pooling",
    "similarity_metric",
    "runtime",
    "precision",
    "tune",
    "index_type",
    "exact_below",
    "store",
    "milvus_uri",
    "collection",
)


def adopt_recorded(settings: Settings, recorded: Mapping[str, Any]) -> Settings:
    """The settings to open an index whose manifest recorded ``recorded`` (the build's ``Settings.to_dict()``).

    The index is the source of truth: each recorded build-time value (:data:`RECORDED_SETTINGS`) replaces a
    setting that was left at its default, so search / serve / stats need only the cache folder. A value set
    explicitly (config file, ``LOOKALIKE_*`` variable, keyword or CLI flag) that contradicts the recorded one
    raises :class:`SettingsError` naming both. Decided exceptions, where a different value does no harm:

    - ``tune``: never a contradiction. A rebuild keeps the index's choice unless ``tune`` is set explicitly
      (``tune: false`` turns tuning off, ``tune: true`` turns it on); loading reads the projection from the index.
    - ``runtime``: at fp32 every runtime gives the same vectors (to float rounding), so the runtime is a matter
      of speed: it is neither adopted nor checked, and ``auto`` picks the fastest. At int8 each runtime rounds
      its own way: the recorded runtime is adopted and a different one is a contradiction.
    - ``precision`` ``auto`` and ``fp32`` are the same on the CPU.
    - ``img_size`` / ``embedding_dim`` unset mean the model's own value: unset and that value are the same.
    - ``data_dir`` is compared as an absolute path; a relative recorded path (older indexes) is not adopted.

    Settings the manifest does not record (older indexes, another store) are left as they are.
    """
    from .settings import SettingsError, _field_names, _validate

    explicit = settings.explicit
    known = set(_field_names())
    changes: dict[str, Any] = {}
    adopted: list[str] = []
    given = {
        k: v for k, v in recorded.items() if k in known and v is not None and (k in RECORDED_SETTINGS or k == "device")
    }
    try:
        parsed = _validate(given)
    except SettingsError as exc:
        raise SettingsError(
            f"the index at {settings.metadata_path} records settings this version cannot use: {exc}"
        ) from None
    for name in RECORDED_SETTINGS:
        if name not in recorded or name not in known:
            continue
        value = parsed.get(name)
        if name == "data_dir":
            if value is None or not Path(value).is_absolute():
                continue
            current = Path(settings.data_dir).expanduser().resolve()
            if name in explicit:
                if current != Path(value):
                    raise _contradiction(settings, name, value, current)
            elif current != Path(value):
                changes[name] = value
                adopted.append(f"{name}={value}")
            continue
        if name == "runtime" and str(recorded.get("precision")) != "int8":
            continue
        if name == "tune":
            if name not in explicit and value != settings.tune:
                changes[name] = value
            continue
        current = getattr(settings, name)
        if _same(name, value, current, settings, recorded):
            continue
        if name in explicit:
            raise _contradiction(settings, name, value, current)
        changes[name] = value
        adopted.append(f"{name}={value}")
    if not changes:
        return settings
    model = changes.get("model_name", settings.model_name)
    if "embedding_dim" not in changes and settings.embedding_dim is not None and "model_name" in changes:
        changes["embedding_dim"] = None  # follows the recorded model
    if "tune" in changes:
        logger.info("the index was built with tune=%s: kept (set tune explicitly to change it)", changes["tune"])
    if adopted:
        logger.info("settings from the index (%s): %s", model, ", ".join(adopted))
    try:
        out = settings.replace(**changes)
    except SettingsError as exc:
        raise SettingsError(f"the index's recorded settings do not combine with yours: {exc}") from None
    object.__setattr__(out, "_explicit", explicit)  # adopted values are the index's, not the user's
    return out


def _effective(name: str, value: Any, model_name: str) -> Any:
    from .backbones import get_backbone

    if value is not None:
        return value
    if name == "img_size":
        return get_backbone(model_name).input_size
    if name == "embedding_dim":
        return get_backbone(model_name).dim
    return value


def _same(name: str, recorded: Any, current: Any, settings: Settings, raw: Mapping[str, Any]) -> bool:
    if recorded == current:
        return True
    if name in {"img_size", "embedding_dim"}:
        model = str(raw.get("model_name", settings.model_name))
        try:
            return _effective(name, recorded, model) == _effective(name, current, settings.model_name)
        except ValueError:
            return False
    if name == "precision":
        cpu = not str(raw.get("device", settings.device)).startswith(("cuda", "auto"))
        return cpu and {recorded, current} <= {"auto", "fp32"}
    return False


def _contradiction(settings: Settings, name: str, recorded: Any, current: Any) -> SettingsError:
    from .settings import SettingsError

    where = settings.metadata_path
    return SettingsError(
        f"{name}: the index at {where} was built with {name}={recorded}, but your settings give {name}={current}. "
        f"Leave {name} unset (flag, LOOKALIKE_{name.upper()}, config file) to use the index's value, or build a "
        f"new index with {name}={current} in another cache_dir."
    )
