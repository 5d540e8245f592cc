# lookalike: every target sets up what it needs first (a virtual environment in .venv).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# PyTorch pair that installs offline on the build machines; override with `make TORCH="torch torchvision"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
GROCERY ?= ../shared/data/grocery

.PHONY: setup demo test test-fast lint format eval serve load bench bench-1m chaos clean \
	milvus-server-venv milvus-server test-milvus-server bench-store bench-ray

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

## the main job on the offline default: index a catalog of real photos and search it, no network
demo: setup
	$(VENV)/bin/lookalike demo

## lint, then every test (fast and slow; slow ones skip with a reason when the real photos are absent)
test: setup lint
	$(VENV)/bin/pytest -m "slow or not slow"

test-fast: setup
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

## retrieval quality on the Grocery Store photos (photo -> catalog)
eval: setup
	$(VENV)/bin/lookalike eval --catalog $(GROCERY)/catalog --queries $(GROCERY)/queries --json results/eval.json

## the HTTP API and web page (http://127.0.0.1:8000/) over the index in cache/ (build it first: lookalike index)
serve: setup
	$(VENV)/bin/lookalike serve

## 32 clients for 60 s posting real photos to `lookalike serve` on 127.0.0.1 (indexes the Grocery catalog first)
load: setup
	$(VENV)/bin/python benchmarks/load.py --catalog $(GROCERY)/catalog --queries $(GROCERY)/queries \
		--clients 32 --duration 60 --json results/load.json

## speed against the seed's pipeline, measured side by side (JSON in results/bench/; README "Speed")
bench: setup
	cd benchmarks && ../$(PY) extract_bench.py --cache-dir ../cache/bench
	cd benchmarks && ../$(PY) search_bench.py

## a million clustered 2048-d vectors: build time, memory, latency, recall (long; not part of bench)
bench-1m: setup
	cd benchmarks && ../$(PY) bench_1m.py

## a real Milvus server: PyPI `milvus` 2.3.5 (embedded standalone) in its own venv, since it needs pymilvus 2.4 and
## setuptools<70; our own pymilvus talks to it. `make milvus-server` runs it on 127.0.0.1:19530 (Ctrl+C stops it).
MILVUS_VENV ?= .venv-milvus
$(MILVUS_VENV)/.installed:
	python3 -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/pip install -q "milvus==2.3.5" "pymilvus>=2.4,<2.5" "setuptools<70"
	touch $@

milvus-server-venv: $(MILVUS_VENV)/.installed

milvus-server: milvus-server-venv
	$(MILVUS_VENV)/bin/milvus-server --data cache/milvus-server

## the store contract against that server (the test starts and stops it; skipped with a reason when it cannot)
test-milvus-server: setup milvus-server-venv
	$(VENV)/bin/pytest -m milvus_server tests/test_store_milvus.py

## Milvus Lite and the Milvus server against FAISS at 10k and 100k vectors (start `make milvus-server` first)
bench-store: setup
	cd benchmarks && ../$(PY) store_bench.py

## executor: ray against local extraction on the Grocery catalog
bench-ray: setup
	cd benchmarks && ../$(PY) ray_bench.py

## the chaos suite, long: kill -9, concurrent writers, disk full / read-only, fuzzing, restart (results/chaos/)
chaos: setup
	cd benchmarks && ../$(PY) -m chaos --out ../results/chaos

clean:
	rm -rf $(VENV) $(MILVUS_VENV) cache results .pytest_cache .ruff_cache
