"""Campaign (c): disk full and read-only at each write of an edit.

For each edit (`lookalike add`, `lookalike remove`, `lookalike index` run in-process through the CLI's ``main``, and
HTTP POST / DELETE through the app), first count the writes it makes, then run it once per write N with the N-th
write failing (ENOSPC, then EROFS): every file-system call that changes something is wrapped (``os.open`` for
writing, ``open``, ``os.replace``, ``os.rename``, ``os.mkdir``, ``os.unlink``, ``os.fsync``, ``shutil.copyfile``,
...). After each run: the caller was told (exit status 1, or an HTTP error that is not 500), and the catalog
folder, the cache and the index are exactly as before; or, if the failed write did not matter, the edit is
complete. Each run starts from a copy of the same catalog at the same path (the cache records absolute paths).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

from .common import TOKEN, Judge, make_workdir, timer

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATCHED = [
    (os, "replace"),
    (os, "rename"),
    (os, "mkdir"),
    (os, "rmdir"),
    (os, "unlink"),
    (os, "remove"),
    (os, "fsync"),
    (os, "link"),
    (os, "symlink"),
    (os, "chmod"),
    (os, "truncate"),
    (os, "ftruncate"),
    (os, "utime"),
    (shutil, "copyfile"),
    (shutil, "copyfileobj"),
]


class Injector:
    """Counts the writes made while active; the ``fail_at``-th raises ``OSError(code)``."""

    def __init__(self, code: int | None = None, fail_at: int = 0):
        self.code, self.fail_at = code, fail_at
        self.count = 0
        self.fired: str = ""
        self._lock = threading.Lock()

    def _hit(self, what: str) -> None:
        with self._lock:
            self.count += 1
            fire = self.code is not None and self.count == self.fail_at
        if fire:
            self.fired = what
            raise OSError(self.code, os.strerror(self.code), f"<injected at write {self.fail_at}: {what}>")

    @contextlib.contextmanager
    def active(self):
        saved = [(mod, name, getattr(mod, name)) for mod, name in PATCHED]
        real_open, real_os_open = io.open, os.open

        def wrap(name, fn):
            def call(*args, **kwargs):
                self._hit(name)
                return fn(*args, **kwargs)

            return call

        def file_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._hit(f"open({Path(str(file)).name!r}, {mode!r})")
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                self._hit(f"os.open({Path(str(path)).name!r})")
            return real_os_open(path, flags, *args, **kwargs)

        try:
            for mod, name, fn in saved:
                setattr(mod, name, wrap(f"{mod.__name__}.{name}", fn))
            io.open = builtins.open = file_open
            os.open = os_open
            yield self
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)
            io.open = builtins.open = real_open
            os.open = real_os_open


@contextlib.contextmanager
def environment(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _client(app):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
        from fastapi.testclient import TestClient
    return TestClient(app, raise_server_exceptions=False)


class Edits:
    """The edits under test, each run against the catalog at ``wd``; each returns (told, http status or None)."""

    def __init__(self, wd, photo: Path):
        self.wd, self.photo = wd, photo

    def cli(self, argv: list[str]) -> tuple[bool, int | None]:
        from lookalike.cli import main

        with (
            environment(self.wd.env()),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            rc = main(argv)
        return rc != 0, None

    def names(self) -> list[str]:
        return ["cli-add", "cli-remove", "cli-index", "http-add", "http-remove"]

    def prepare(self, name: str):
        """Everything before the edit (not counted): returns a callable that makes the edit."""
        if name == "cli-add":
            return lambda: self.cli(["add", "new-product", str(self.photo)])
        if name == "cli-remove":
            return lambda: self.cli(["remove", "seed-0"])
        if name == "cli-index":
            shutil.copyfile(self.photo, self.wd.catalog / "seed-1" / "dropped-in.jpg")  # a user added a photo
            return lambda: self.cli(["index"])
        from lookalike import ImageSearchEngine
        from lookalike.server import create_app

        engine = ImageSearchEngine(self.wd.settings())
        engine.load_index()
        client = _client(create_app(engine=engine))
        client.__enter__()
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def run():
            try:
                if name == "http-add":
                    files = {"images": (self.photo.name, self.photo.read_bytes(), "image/jpeg")}
                    r = client.post("/products/new-product/images", files=files, headers=auth)
                else:
                    r = client.delete("/products/seed-0", headers=auth)
            finally:
                client.__exit__(None, None, None)
            return not 200 <= r.status_code < 300, r.status_code

        return run


def fault_campaign(root: Path, *, codes=(errno.ENOSPC, errno.EROFS), edits=None, max_writes: int = 200) -> dict:
    """Campaign (c); ``edits`` picks some of Edits.names()."""
    work = Path(root) / "trial"
    wd = make_workdir(work)
    pristine = Path(root) / "pristine"
    shutil.copytree(work, pristine, symlinks=True)
    photo = pristine / "pool" / "pool-000.jpg"
    judge = Judge(wd)
    trials, problems = [], []

    def reset():
        shutil.rmtree(work)
        shutil.copytree(pristine, work, symlinks=True)

    def state():
        try:
            index, catalog, cache, build = judge.view()
            return {"index": index, "catalog": catalog, "cache": cache, "build": build}
        except Exception as exc:
            return {"load_error": f"{type(exc).__name__}: {exc}"}

    def same(a, b, *, build=True, keys=("index", "catalog")):
        keys = list(keys) + (["build"] if build else [])
        return "load_error" not in a and "load_error" not in b and all(a[k] == b[k] for k in keys)

    names = edits or Edits(wd, photo).names()
    logging.disable(logging.ERROR)  # every failed edit logs its error: thousands of expected lines
    with contextlib.ExitStack() as stack:
        stack.callback(logging.disable, logging.NOTSET)
        took = stack.enter_context(timer())
        for name in names:
            reset()
            edit = Edits(wd, photo).prepare(name)
            before = state()
            counter = Injector()
            with counter.active():
                told, status = edit()
            if told:
                problems.append(f"{name}: fails without any injected fault (status {status})")
                continue
            expected = state()
            writes = counter.count
            for code in codes:
                for n in range(1, min(writes, max_writes) + 1):
                    reset()
                    edit = Edits(wd, photo).prepare(name)
                    before = state()
                    inj = Injector(code, n)
                    with inj.active():
                        try:
                            told, status = edit()
                        except Exception as exc:  # a crash of the caller itself (not an error it reports)
                            told, status = True, f"crash {type(exc).__name__}: {exc}"
                    after = state()
                    http_500 = isinstance(status, int) and status >= 500 and status not in (503, 507)
                    crashed = isinstance(status, str)
                    want = before if told else expected
                    ok = same(want, after, build=told)
                    # The cache is an accelerator: when only its last rename fails after the index committed, an
                    # acknowledged edit may leave it as it was (the next build extracts those photos again).
                    cache_ok = same(want, after, build=False, keys=("cache",)) or (
                        not told and same(before, after, build=False, keys=("cache",))
                    )
                    trial = {
                        "edit": name,
                        "errno": errno.errorcode[code],
                        "write": n,
                        "call": inj.fired,
                        "told": told,
                        "status": status,
                        "state_ok": ok,
                        "cache_ok": cache_ok,
                        "http_500": http_500 or crashed,
                    }
                    trials.append(trial)
                    if not ok or not cache_ok or http_500 or crashed:
                        detail = _diff(before if told else expected, after)
                        problems.append(
                            f"{name} {errno.errorcode[code]} at write {n} ({inj.fired}), status {status}: {detail}"
                        )
    half = [t for t in trials if not t["state_ok"]]
    per_edit = {}
    for name in names:
        mine = [t for t in trials if t["edit"] == name]
        per_edit[name] = {
            "writes": max((t["write"] for t in mine), default=0),
            "runs": len(mine),
            "told": sum(t["told"] for t in mine),
            "half_applied": sum(not t["state_ok"] for t in mine),
            "cache_differs": sum(not t["cache_ok"] for t in mine),
            "http_500": sum(t["http_500"] for t in mine),
        }
    return {
        "campaign": "faults",
        "runs": len(trials),
        "told": sum(t["told"] for t in trials),
        "not_told_but_complete": sum((not t["told"]) and t["state_ok"] for t in trials),
        "half_applied": len(half),
        "cache_differs": sum(not t["cache_ok"] for t in trials),
        "http_500": sum(t["http_500"] for t in trials),
        "seconds": round(took["s"], 1),
        "per_edit": per_edit,
        "examples": {
            "problems": problems[:15],
            "http_500": [p for p in problems if "status 500" in p or "crash" in p][:10],
        },
    }


def _diff(want: dict, got: dict) -> str:
    if "load_error" in got:
        return f"the index does not load: {got['load_error']}"[:300]
    if "load_error" in want:
        return "the state before did not load"
    out = []
    for key in ("index", "catalog", "cache"):
        for product in sorted(set(want[key]) | set(got[key])):
            if want[key].get(product) != got[key].get(product):
                was, now = sorted(want[key].get(product, [])), sorted(got[key].get(product, []))
                out.append(f"{key}[{product}]: {was} -> {now}")
    if want.get("build") != got.get("build") and not out:
        out.append("a new index generation with the same content")
    return "; ".join(out)[:400]
