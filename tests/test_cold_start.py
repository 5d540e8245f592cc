"""Cold start: ``import lookalike`` is cheap, settings never import torch, and a search on a built index with an
exported OpenVINO model does not import torch at all (each check runs in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PRODUCTS, product_image, write_catalog

SRC = Path(__file__).resolve().parents[1] / "src"


def run_python(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env["PYTHONPATH"] = str(SRC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = "['torch', 'torchvision', 'faiss', 'openvino', 'onnxruntime', 'lookalike.engine', 'lookalike.backbones']"


def test_import_lookalike_loads_nothing_heavy(tmp_path):
    code = f"import json, sys, lookalike; print(json.dumps([m for m in {HEAVY} if m in sys.modules]))"
    assert run_python(code, tmp_path) == []


def test_public_names_are_still_there_on_first_use(tmp_path):
    code = (
        "import json, lookalike; names = sorted(n for n in lookalike.__all__ if n != '__version__');"
        "print(json.dumps([n for n in names if getattr(lookalike, n).__name__ != n]))"
    )
    assert run_python(code, tmp_path) == []


def test_settings_validate_without_torch(tmp_path):
    code = (
        "import json, sys; from lookalike.settings import Settings;"
        "s = Settings(config_file=None, environ={}, model_name='efficientnet_lite2', embedding_dim=1280);"
        "print(json.dumps(['torch' in sys.modules, s.input_size]))"
    )
    assert run_python(code, tmp_path) == [False, 260]


def test_lite_aux_channels_written_out_match_the_network():
    from lookalike.backbones import LITE_LAST_BLOCK_CHANNELS
    from lookalike.efficientnet_lite import VARIANTS, _round_filters

    for n, channels in LITE_LAST_BLOCK_CHANNELS.items():
        assert channels == _round_filters(320, VARIANTS[f"efficientnet-lite{n}"].width)


def test_search_on_a_built_index_does_not_import_torch(tmp_path):
    write_catalog(tmp_path / "catalog", PRODUCTS)
    product_image(0, 50).save(tmp_path / "query.jpg")
    flags = "['--model-name', 'test_tiny', '--data-dir', 'catalog', '--cache-dir', 'cache']"
    build = f"import json; from lookalike.cli import main; print(json.dumps(main(['index', *{flags}])))"
    assert run_python(build, tmp_path) == 0  # builds the index and exports the model
    search = (
        "import io, json, sys, contextlib; from lookalike.cli import main; out = io.StringIO();\n"
        f"with contextlib.redirect_stdout(out): code = main(['search', 'query.jpg', '--json', *{flags}])\n"
        "print(json.dumps([code, 'torch' in sys.modules, json.loads(out.getvalue().splitlines()[0])['product_id']]))"
    )
    assert run_python(search, tmp_path) == [0, False, "red-disc"]
