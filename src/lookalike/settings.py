"""The one configuration object.

Values are resolved in this order, each layer overriding the one before:
defaults < ``configs/configs.yaml`` (or ``LOOKALIKE_CONFIG`` / an explicit ``config_file``)
< environment variables ``LOOKALIKE_<SETTING>`` < keyword arguments (what the CLI's flags become).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# Re-exported: these were defined here and are imported from here.
from .settings_docs import DEFAULT_TEXT, DESCRIPTIONS, default_text, describe_setting  # noqa: F401
from .settings_recorded import RECORDED_SETTINGS, adopt_recorded  # noqa: F401

logger = logging.getLogger(__name__)

ENV_PREFIX = "LOOKALIKE_"
DEFAULT_CONFIG_FILE = Path("configs/configs.yaml")
METRICS = ("cosine", "l2")
POOLINGS = ("center", "avg")
RUNTIMES = ("auto", "torch", "onnx", "openvino")  # what runs the network (lookalike.runtime); auto: fastest installed
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_RUNTIME_PRECISIONS = {
    "auto": ("auto", "fp32", "fp16", "bf16", "int8"),  # lookalike.runtime.resolve_runtime picks one that runs it
    "torch": ("auto", "fp32", "fp16", "bf16"),
    "onnx": ("auto", "fp32", "int8"),
    "openvino": ("auto", "fp32", "bf16", "int8"),
}
_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_AUTO = object()


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the key, the value and what is allowed."""


@dataclass(frozen=True, init=False)
class Settings:
    """Resolved settings. ``Settings(**overrides)`` applies the whole precedence chain with ``overrides`` on top.

    ``config_file`` picks the YAML file (``None`` reads none); ``environ`` replaces ``os.environ`` (tests use it).
    """

    device: str = "cpu"
    img_size: int | None = None  # None: the model's own input size (224 for the ImageNet backbones)
    batch_size: int = 32
    embedding_dim: int | None = None  # None: whatever the model produces; a number must agree with it
    model_name: str = "efficientnet_lite0"
    similarity_metric: str = "cosine"
    pooling: str = "center"  # "center": centre-weighted average of the feature map; "avg": plain average
    # build_index learns from the catalog's own product labels: true: a projection (LDA, seconds); "finetune": trains
    # the backbone's last block first (minutes, cached), then the projection on top; false: neither
    tune: bool | str = True
    data_dir: Path = Path("data")
    cache_dir: Path = Path("cache")
    index_file: Path | None = None  # default: <cache_dir>/index.faiss
    metadata_file: Path | None = None  # default: <cache_dir>/metadata.json
    weights_path: Path | None = None  # a local checkpoint instead of the backbone's standard weights
    pretrained: bool = True  # False builds random weights (speed benchmarks only), with a warning
    num_workers: int = 2  # image decoding threads that run beside inference
    runtime: str = "auto"  # auto (OpenVINO, else ONNX Runtime, else torch), torch, onnx or openvino
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16, int8 (static quantization)
    threads: int | None = None  # threads the network may use; None: the runtime's default (one per core)
    index_type: str = "auto"  # auto: exact below exact_below images, approximate above; or a FAISS factory string
    exact_below: int = 10_000  # with index_type auto: catalogs smaller than this get exact search
    store: str = "faiss"  # where vectors live: faiss (embedded, in cache_dir) or milvus (Milvus Lite or a server)
    milvus_uri: str | None = None  # store milvus: a file (Milvus Lite) or http://host:19530; None: cache_dir/milvus.db
    collection: str = "lookalike"  # store milvus: the collection name
    executor: str = "local"  # feature extraction: local (this process) or ray (Ray Data, see docs/scaling.md)
    ray_address: str | None = None  # executor ray: the cluster address; None starts a local Ray
    max_image_pixels: int = 40_000_000  # larger images are refused (decompression bombs)
    # HTTP server (`lookalike serve`)
    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 for every interface
    port: int = 8000
    admin_token: str | None = field(default=None, repr=False)  # bearer token for catalog changes; unset: disabled
    max_upload_bytes: int = 10_000_000  # larger request bodies are answered 413
    max_concurrent_searches: int = 2  # searches running at once (threads beside the event loop)
    search_queue_size: int = 16  # searches that may wait for one; beyond that: 503 with Retry-After
    config_file: Path | None = field(default=None, compare=False)  # where the YAML layer came from, if anywhere

    def __init__(self, *, config_file: Any = _AUTO, environ: Mapping[str, str] | None = None, **overrides: Any):
        env = os.environ if environ is None else environ
        if config_file is _AUTO:
            config_file = env.get(ENV_PREFIX + "CONFIG") or (
                DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None
            )
        values: dict[str, Any] = {}
        if config_file is not None:  # a null in the file means "the default"
            values.update({k: v for k, v in _read_yaml(Path(config_file)).items() if v is not None})
        for name in _field_names():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        _warn_unknown_environment(env)
        unknown = sorted(set(overrides) - set(_field_names()))
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(_field_names())}")
        values.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE})
        resolved = _validate(values)
        for f in fields(self):
            object.__setattr__(self, f.name, resolved.get(f.name, f.default))
        object.__setattr__(self, "config_file", Path(config_file) if config_file is not None else None)
        object.__setattr__(self, "_explicit", frozenset(values))

    @property
    def explicit(self) -> frozenset[str]:
        """The settings given a value by the config file, a ``LOOKALIKE_*`` variable or a keyword (a CLI flag);
        every other setting holds its default. :func:`adopt_recorded` lets an index's recorded values replace
        defaults only."""
        return self._explicit  # type: ignore[attr-defined]

    # Derived paths, so that a changed cache_dir moves everything with it.
    @property
    def input_size(self) -> int:
        """The side of the square the model sees: ``img_size`` or the model's own default."""
        from .backbones import get_backbone

        return self.img_size if self.img_size is not None else get_backbone(self.model_name).input_size

    @property
    def index_path(self) -> Path:
        return self.index_file if self.index_file is not None else self.cache_dir / "index.faiss"

    @property
    def metadata_path(self) -> Path:
        return self.metadata_file if self.metadata_file is not None else self.cache_dir / "metadata.json"

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated); environment and YAML are not read again."""
        current = {name: getattr(self, name) for name in _field_names()}
        current.update(changes)
        out = Settings(config_file=None, environ={}, **current)
        object.__setattr__(out, "config_file", self.config_file)  # still where these values came from
        object.__setattr__(out, "_explicit", self.explicit | set(changes))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, written next to what a build produced. Secrets (the admin token) are left out.

        ``data_dir`` is written absolute: an index records where its catalog is, so that it opens from any folder
        (:func:`adopt_recorded` does not adopt a relative one, whose meaning depended on the build's folder)."""
        out = {}
        for name in _field_names():
            if name in SECRET_SETTINGS:
                continue
            value = getattr(self, name)
            if name == "data_dir":
                value = Path(value).expanduser().resolve()
            out[name] = str(value) if isinstance(value, Path) else value
        return out


_NULLABLE = {"img_size", "threads", "embedding_dim", "index_file", "metadata_file", "weights_path", "admin_token"}
_NULLABLE |= {"milvus_uri", "ray_address"}
STORES = ("faiss", "milvus")
EXECUTORS = ("local", "ray")
_COLLECTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
SECRET_SETTINGS = frozenset({"admin_token"})  # never in to_dict(), repr() or an error message
MIN_ADMIN_TOKEN_LENGTH = 16
_HOST_RE = re.compile(r"^[A-Za-z0-9.:\-\[\]%]{1,253}$")


def _is_unset(value: Any) -> bool:
    return value is None or str(value).strip().lower() in {"none", "null", "auto", ""}


def _field_names() -> list[str]:
    return [f.name for f in fields(Settings) if f.name != "config_file"]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of setting: value, not {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(_field_names()))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} in {path}; known settings: {', '.join(_field_names())}")
    return dict(data)


def _as_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"{name}={value!r} is not allowed: expected an integer from {lo} to {hi}")
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or not lo <= number <= hi:
        raise SettingsError(f"{name}={value!r} is not allowed: expected an integer from {lo} to {hi}")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={value!r} is not allowed: expected true or false")


TUNE_FINETUNE = "finetune"


def parse_tune(value: Any) -> bool | str:
    """A ``tune`` value as the setting holds it (True, False or "finetune"); SettingsError otherwise."""
    return _as_tune("tune", value)


def _as_tune(name: str, value: Any) -> bool | str:
    """``tune``: true (the LDA projection), false, or "finetune" (the backbone's last block, then the LDA)."""
    if isinstance(value, str) and value.strip().lower() == TUNE_FINETUNE:
        return TUNE_FINETUNE
    try:
        return _as_bool(name, value)
    except SettingsError:
        raise SettingsError(f"{name}={value!r} is not allowed: expected true, false or finetune") from None


def _as_path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or str(value).strip() == "":
        raise SettingsError(f"{name}={value!r} is not allowed: expected a file system path")
    return Path(os.path.expanduser(str(value)))


def _as_token(name: str, value: Any) -> str | None:
    """A bearer token: printable ASCII without spaces, long enough to resist guessing. The value is never echoed."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    text = value if isinstance(value, str) else None
    if text is None or len(text) < MIN_ADMIN_TOKEN_LENGTH or not all(33 <= ord(c) <= 126 for c in text):
        got = f"{len(text)} characters" if text is not None else f"a {type(value).__name__}"
        raise SettingsError(
            f"{name} is not allowed (value not shown): expected at least {MIN_ADMIN_TOKEN_LENGTH} printable ASCII "
            f"characters without spaces, got {got}; e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return text


def _validate(values: dict[str, Any]) -> dict[str, Any]:
    from .backbones import available_backbones, get_backbone  # registry import is deferred: it pulls in torch

    out: dict[str, Any] = {}
    for name, value in values.items():
        if name == "device":
            text = str(value).strip().lower()
            if not _DEVICE_RE.match(text):
                raise SettingsError(f"device={value!r} is not allowed: expected cpu, cuda, cuda:<n> or auto")
            out[name] = text
        elif name == "img_size":
            out[name] = None if _is_unset(value) else _as_int(name, value, 32, 2048)
        elif name == "batch_size":
            out[name] = _as_int(name, value, 1, 4096)
        elif name == "num_workers":
            out[name] = _as_int(name, value, 0, 64)
        elif name == "threads":
            out[name] = None if _is_unset(value) else _as_int(name, value, 1, 1024)
        elif name == "exact_below":
            out[name] = _as_int(name, value, 0, 2_000_000_000)
        elif name in {"runtime", "precision"}:
            text = str(value).strip().lower()
            allowed = RUNTIMES if name == "runtime" else PRECISIONS
            if text not in allowed:
                raise SettingsError(f"{name}={value!r} is not allowed: expected one of {', '.join(allowed)}")
            out[name] = text
        elif name == "index_type":
            out[name] = _as_index_type(name, value)
        elif name == "max_image_pixels":
            out[name] = _as_int(name, value, 1, 1_000_000_000)
        elif name == "embedding_dim":
            out[name] = None if _is_unset(value) else _as_int(name, value, 1, 65536)
        elif name == "model_name":
            text = str(value).strip()
            if text not in available_backbones():
                raise SettingsError(
                    f"model_name={value!r} is not allowed: known models are {', '.join(available_backbones())}"
                )
            out[name] = text
        elif name == "similarity_metric":
            text = str(value).strip().lower()
            if text not in METRICS:
                raise SettingsError(f"similarity_metric={value!r} is not allowed: expected one of {', '.join(METRICS)}")
            out[name] = text
        elif name == "pooling":
            text = str(value).strip().lower()
            if text not in POOLINGS:
                raise SettingsError(f"pooling={value!r} is not allowed: expected one of {', '.join(POOLINGS)}")
            out[name] = text
        elif name in {"data_dir", "cache_dir"}:
            out[name] = _as_path(name, value)
        elif name in {"index_file", "metadata_file", "weights_path"}:
            out[name] = None if _is_unset(value) else _as_path(name, value)
        elif name == "pretrained":
            out[name] = _as_bool(name, value)
        elif name == "tune":
            out[name] = _as_tune(name, value)
        elif name == "host":
            text = str(value).strip()
            if not _HOST_RE.match(text):
                raise SettingsError(
                    f"host={value!r} is not allowed: expected an IP address or host name, e.g. 127.0.0.1"
                )
            out[name] = text
        elif name == "port":
            out[name] = _as_int(name, value, 1, 65535)
        elif name in {"store", "executor"}:
            text = str(value).strip().lower()
            allowed = STORES if name == "store" else EXECUTORS
            if text not in allowed:
                raise SettingsError(f"{name}={value!r} is not allowed: expected one of {', '.join(allowed)}")
            out[name] = text
        elif name in {"milvus_uri", "ray_address"}:
            out[name] = None if value is None or str(value).strip() in {"", "none", "null"} else str(value).strip()
        elif name == "collection":
            text = str(value).strip()
            if not _COLLECTION_RE.match(text):
                raise SettingsError(
                    f"collection={value!r} is not allowed: expected letters, digits and '_' (not first a digit)"
                )
            out[name] = text
        elif name == "admin_token":
            out[name] = _as_token(name, value)
        elif name == "max_upload_bytes":
            out[name] = _as_int(name, value, 1024, 1_000_000_000)
        elif name == "max_concurrent_searches":
            out[name] = _as_int(name, value, 1, 64)
        elif name == "search_queue_size":
            out[name] = _as_int(name, value, 0, 10_000)
    model = out.get("model_name", Settings.model_name)
    dim = out.get("embedding_dim")
    if dim is not None and dim != get_backbone(model).dim:
        raise SettingsError(
            f"embedding_dim={dim} is not allowed with model_name={model!r}: that model produces "
            f"{get_backbone(model).dim}-d vectors (leave embedding_dim unset to follow the model)"
        )
    runtime, precision = out.get("runtime", Settings.runtime), out.get("precision", Settings.precision)
    if precision not in _RUNTIME_PRECISIONS[runtime]:
        raise SettingsError(
            f"precision={precision!r} is not allowed with runtime={runtime!r}: it runs "
            f"{', '.join(_RUNTIME_PRECISIONS[runtime])} (int8 needs runtime onnx or openvino)"
        )
    device = out.get("device", Settings.device)
    if runtime == "openvino" and device.startswith("cuda"):
        raise SettingsError(f"runtime='openvino' is not allowed with device={device!r}: OpenVINO runs on the CPU here")
    if precision == "fp16" and device == "cpu":
        raise SettingsError(
            "precision='fp16' is not allowed with device='cpu': fp16 is for CUDA GPUs (use fp32 or int8)"
        )
    return out


def _as_index_type(name: str, value: Any) -> str:
    """``auto`` or a FAISS index factory string (checked by FAISS itself when the index is built)."""
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    if not _INDEX_TYPE_RE.match(text):
        raise SettingsError(
            f"{name}={value!r} is not allowed: expected auto or a FAISS index factory string such as Flat, "
            "HNSW32,SQ8, IVF1024,PQ64 or PCA256,HNSW32"
        )
    return text


_INDEX_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_,.()x=+]{0,199}$")


def settings_fields() -> list[dataclasses.Field]:
    """The user-facing settings, in declaration order (the CLI builds its flags from these)."""
    return [f for f in fields(Settings) if f.name != "config_file"]


# --- unknown environment variables -----------------------------------------------------------------------------

_NOT_SETTINGS = {"CONFIG", "GROCERY"}  # the YAML file; where benchmarks/ find the real photos
_warned_env: set[str] = set()


def _warn_unknown_environment(env: Mapping[str, str]) -> list[str]:
    """A warning (once per process and name) for each ``LOOKALIKE_*`` variable that names no setting: a typo
    there would otherwise be ignored in silence. Returns the unknown names."""
    known = {name.upper() for name in _field_names()} | _NOT_SETTINGS
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in known)
    for key in unknown:
        if key in _warned_env:
            continue
        _warned_env.add(key)
        close = difflib.get_close_matches(key[len(ENV_PREFIX) :], sorted(known - _NOT_SETTINGS), n=1, cutoff=0.6)
        hint = f"did you mean {ENV_PREFIX}{close[0]} (setting {close[0].lower()})?" if close else "no such setting"
        logger.warning("environment variable %s is ignored: %s", key, hint)
    return unknown
