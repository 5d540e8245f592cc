"""Never lose an acknowledged change: one writer at a time across processes, engines that notice each other's
commits, and edits that are all or nothing (failures injected at every write and rename of an edit)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import pytest

import lookalike.engine
from conftest import PRODUCTS, product_image, write_catalog
from lookalike import CatalogWriteError, ImageSearchEngine
from lookalike.edits import JOURNAL, Edit
from lookalike.ids import MAX_PRODUCT_ID_BYTES, InvalidProductIdError

N_IMAGES = sum(PRODUCTS.values())


@pytest.fixture
def built(make_settings, catalog):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    return settings


def loaded(settings) -> ImageSearchEngine:
    engine = ImageSearchEngine(settings)
    engine.load_index()
    return engine


def photo(tmp_path: Path, look: int, name: str = "new.jpg") -> Path:
    folder = tmp_path / f"incoming-{look}"
    folder.mkdir(exist_ok=True)
    path = folder / name
    product_image(look, 300).save(path)
    return path


def products(settings) -> dict[str, int]:
    return loaded(settings).images_per_product()


# --- several writers --------------------------------------------------------------------------------------------

CHILD = """
import pathlib, sys, time
from lookalike import ImageSearchEngine, Settings
data_dir, cache_dir, product, photo, go = sys.argv[1:6]
settings = Settings(config_file=None, environ={}, model_name="test_tiny", data_dir=data_dir, cache_dir=cache_dir,
                    batch_size=4, num_workers=0)
engine = ImageSearchEngine(settings)
engine.load_index()
engine.extractor  # the model is loaded before the race starts
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.002)
print("added", engine.add_images(product, [photo])["added"], flush=True)
"""


def test_two_processes_adding_at_once_both_keep_their_product_and_a_running_engine_serves_them(
    built, tmp_path, monkeypatch
):
    running = loaded(built)  # loaded before the other processes commit, like a server
    photos = [photo(tmp_path, 5 + i) for i in range(2)]
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(built.data_dir),
                str(built.cache_dir),
                f"new-{i}",
                str(photos[i]),
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    go.touch()  # both add at the same moment
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "added 1", err
    counts = products(built)
    assert counts["new-0"] == counts["new-1"] == 1 and sum(counts.values()) == N_IMAGES + 2

    monkeypatch.setattr(lookalike.engine, "REFRESH_SECONDS", 0.0)  # the documented delay is at most 1 s
    assert [running.search(p, top_k=1)[0]["product_id"] for p in photos] == ["new-0", "new-1"]
    assert running.get_statistics()["images"] == N_IMAGES + 2


def test_a_stale_engine_writes_on_top_of_another_engines_commit(built, tmp_path):
    first, second = loaded(built), loaded(built)
    first.add_images("from-first", [photo(tmp_path, 5)])
    second.add_images("from-second", [photo(tmp_path, 6)])  # loaded before the first add: refreshes under the lock
    second.remove_product("red-disc")
    counts = products(built)
    assert {"from-first", "from-second"} <= set(counts) and "red-disc" not in counts


def test_a_running_engine_notices_a_commit_within_the_refresh_delay(built, tmp_path, monkeypatch):
    running, writer = loaded(built), loaded(built)
    clock = [1000.0]
    monkeypatch.setattr(lookalike.engine.time, "monotonic", lambda: clock[0])
    running._checked = clock[0]
    writer.add_images("fresh", [photo(tmp_path, 5)])
    assert running.get_statistics()["images"] == N_IMAGES  # within the delay: the generation it had
    clock[0] += lookalike.engine.REFRESH_SECONDS
    assert running.get_statistics()["images"] == N_IMAGES + 1


# --- all or nothing -------------------------------------------------------------------------------------------


def state(settings) -> tuple:
    """Everything an edit may touch: the catalog tree (files with their bytes, folders), the embedding cache, the
    committed index manifest, and no journal left behind."""
    root = Path(settings.data_dir)
    tree = {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }
    caches = {p.name: p.read_bytes() for p in sorted((Path(settings.cache_dir) / "embeddings").glob("*.npz"))}
    journal = (Path(settings.cache_dir) / JOURNAL).exists()
    return tree, caches, settings.metadata_path.read_bytes(), journal


class Failing:
    """Makes the n-th file operation of an edit fail (``persistent``: every space-needing one from then on)."""

    def __init__(self, root: Path, n: int, code: int, persistent: bool = False):
        self.root, self.n, self.code, self.persistent = str(root), n, code, persistent
        self.calls = 0
        self.failed = False

    def wrap(self, real, *, needs_space: bool):
        def op(*args, **kwargs):
            where = str(kwargs.get("dir") or (args[0] if args else ""))
            if where.startswith(self.root):
                self.calls += 1
                hit = self.calls == self.n or (self.persistent and self.calls >= self.n and needs_space)
                if hit:
                    self.failed = True
                    raise OSError(self.code, os.strerror(self.code), where)
            return real(*args, **kwargs)

        return op

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(tempfile, "mkstemp", self.wrap(tempfile.mkstemp, needs_space=True))
        monkeypatch.setattr(shutil, "copyfile", self.wrap(shutil.copyfile, needs_space=True))
        monkeypatch.setattr(os, "replace", self.wrap(os.replace, needs_space=False))
        monkeypatch.setattr(os, "rename", self.wrap(os.rename, needs_space=False))


EDITS = {
    "add": lambda e, tmp: e.add_images("newcomer", [photo(tmp, 6), photo(tmp, 7, "other.png")]),
    "add-existing": lambda e, tmp: e.add_images("red-disc", [photo(tmp, 0)]),
    "remove": lambda e, tmp: e.remove_product("green-bar"),
    "index": lambda e, tmp: e.build_index(force_rebuild=True, tune=False),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize(("code", "persistent"), [(errno.ENOSPC, False), (errno.ENOSPC, True), (errno.EROFS, False)])
def test_a_failed_edit_leaves_catalog_cache_and_index_as_they_were(
    built, tmp_path, monkeypatch, caplog, edit, code, persistent
):
    if edit == "index":
        write_catalog(Path(built.data_dir), {"late-arrival": 2})  # a build that would change something
    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path, pristine, ignore=shutil.ignore_patterns("pristine"), symlinks=True)
    for n in range(1, 60):
        for name in ("catalog", "cache"):
            shutil.rmtree(tmp_path / name)
            shutil.copytree(pristine / name, tmp_path / name)
        before = state(built)
        engine = loaded(built)
        failing = Failing(tmp_path, n, code, persistent)
        with monkeypatch.context() as patch:
            failing.install(patch)
            try:
                EDITS[edit](engine, tmp_path)
            except CatalogWriteError as exc:
                assert exc.errno == code and ("disk full" in str(exc) or "read-only" in str(exc))
            else:  # only the step after the commit may fail without failing the edit: the cache, rebuilt later
                assert not failing.failed or "embedding cache could not be updated" in caplog.text, n
        if not failing.failed:
            break  # every operation of the edit has had its turn
        if "embedding cache could not be updated" in caplog.text:
            assert state(built)[2] != before[2]  # the edit was committed
            break
        assert state(built) == before, f"operation {n} of {edit} failed and left a change behind"
        assert loaded(built).images_per_product() == engine.images_per_product()  # memory matches disk
    else:
        pytest.fail("the edit never finished")
    assert n > 3  # the edit was exercised at several writes


def test_a_crash_mid_add_is_undone_by_the_next_writer(built, tmp_path, monkeypatch):
    engine = loaded(built)
    before = products(built)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies between moving the photos and committing the index

    monkeypatch.setattr(Edit, "__exit__", lambda self, *exc: False)  # a crash runs no clean-up
    monkeypatch.setattr(engine.store, "upsert", crash)
    with pytest.raises(KeyboardInterrupt):
        engine.add_images("ghost", [photo(tmp_path, 8)])
    monkeypatch.undo()
    assert (Path(built.data_dir) / "ghost").is_dir() and (Path(built.cache_dir) / JOURNAL).is_file()
    other = loaded(built)
    other.remove_product("yellow-disc")  # the next writer finds the journal first
    assert not (Path(built.data_dir) / "ghost").exists() and not (Path(built.cache_dir) / JOURNAL).exists()
    after = products(built)
    assert "ghost" not in after and after == {k: v for k, v in before.items() if k != "yellow-disc"}
    assert not list(Path(built.data_dir).glob(".staging-*"))


# --- product ids ----------------------------------------------------------------------------------------------


def test_long_non_ascii_ids_can_be_added_and_removed(built, tmp_path):
    engine = loaded(built)
    long_id = "é" * (MAX_PRODUCT_ID_BYTES // 2)  # 180 bytes of UTF-8
    long_name = "x" * 240 + ".jpg"  # a source file name near the file system's limit
    out = engine.add_images(long_id, [photo(tmp_path, 5, long_name)])
    assert out["added"] == 1 and all(len(p.name.encode()) <= 255 for p in Path(built.data_dir).rglob("*"))
    removed = engine.remove_product(long_id)
    assert removed["removed"] == 1 and len(Path(removed["moved_to"]).name.encode()) <= 255
    with pytest.raises(InvalidProductIdError):
        engine.add_images("é" * (MAX_PRODUCT_ID_BYTES // 2 + 1), [photo(tmp_path, 5)])


def test_composed_and_decomposed_ids_are_one_product(built, tmp_path):
    engine = loaded(built)
    decomposed = unicodedata.normalize("NFD", "café")
    engine.add_images(decomposed, [photo(tmp_path, 5)])
    engine.add_images("café", [photo(tmp_path, 6)])
    assert engine.images_per_product()["café"] == 2 and decomposed not in engine.images_per_product()
    assert engine.remove_product(decomposed)["removed"] == 2
    with pytest.raises(InvalidProductIdError, match="bidirectional"):
        engine.add_images("abc\u202edef", [photo(tmp_path, 5)])


def test_the_writer_lock_is_held_across_the_whole_change(built, tmp_path, monkeypatch):
    """While one engine changes the catalog, another process cannot take the lock (checked with flock LOCK_NB)."""
    import fcntl

    engine = loaded(built)
    seen = []
    real = engine.extractor.extract

    def probe(*args, **kwargs):
        with open(Path(built.cache_dir) / ".write.lock", "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.extractor, "extract", probe)
    started = time.monotonic()
    engine.add_images("locked", [photo(tmp_path, 5)])
    assert seen == ["held"] and time.monotonic() >= started


def test_searches_go_on_while_another_engine_commits(built, tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(lookalike.engine, "REFRESH_SECONDS", 0.0)  # refresh on every search: the worst case
    reader, writer = loaded(built), loaded(built)
    query = photo(tmp_path, 5, "query.jpg")
    errors: list[BaseException] = []
    stop = threading.Event()

    def searching() -> None:
        while not stop.is_set():
            try:
                assert reader.search(query, top_k=3)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    thread = threading.Thread(target=searching)
    thread.start()
    try:
        for i in range(3):
            writer.add_images(f"x{i}", [photo(tmp_path, 6 + i, f"{i}.jpg")])
        writer.remove_product("x0")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert reader.get_statistics()["images"] == writer.get_statistics()["images"] == N_IMAGES + 2
