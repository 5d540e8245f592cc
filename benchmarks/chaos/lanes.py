"""Writers and searchers that the campaigns run side by side, each in a harness thread driving real processes:

- ``WorkerLane``: a long-running process (``chaos.worker``) that runs `lookalike add/remove` in-process, the CLI's
  own code, killed with SIGKILL at a random moment;
- ``CliLane``: one real `lookalike add/remove` process per edit, killed at a random moment of its run;
- ``ServerLane``: `lookalike serve` with HTTP POST/DELETE against it, the server killed at a random moment;
- ``SearchLane``: a worker process running `lookalike search` in a loop (never killed), counting failures.

Every lane writes its own products only (ids prefixed by the lane), records what was acknowledged in the shared
:class:`~chaos.common.Ledger`, and after each kill asks the :class:`~chaos.common.Judge` about its products.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from .common import ABSENT, PRESENT, TOKEN, UNKNOWN, Judge, Ledger, Verdict, Workdir, free_port

AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Lane:
    kind = "lane"

    def __init__(self, name: str, wd: Workdir, ledger: Ledger, judge: Judge | None, rng: random.Random, **opts):
        self.name, self.wd, self.ledger, self.judge, self.rng = name, wd, ledger, judge, rng
        self.opts = opts
        self.kills = 0
        self.edits = 0
        self.refused: list[str] = []  # edits answered with a failure (the caller was told): reason
        self.server_errors = 0  # HTTP 5xx other than 503 / 507
        self.verdict = Verdict()
        self.mine: list[str] = []
        self._n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"chaos-{name}", daemon=True)
        self.error: str = ""

    # --- what an edit is --------------------------------------------------------------------------------------

    def next_edit(self) -> tuple[str, str, list[Path]]:
        """("add", product, photos) for a new product, or ("remove", product, []) for one of ours that is present."""
        present = [p for p, (state, _) in self.ledger.items(self.mine) if state == PRESENT]
        if present and self.rng.random() < self.opts.get("remove_share", 0.4):
            return "remove", self.rng.choice(present), []
        self._n += 1
        product = f"{self.name}-{self._n}"
        self.mine.append(product)
        pool = self.wd.pool_photos(self.opts.get("pool", 16))
        return "add", product, self.rng.sample(pool, self.rng.randint(1, 2))

    def before(self, op: str, product: str) -> tuple[str, frozenset[str]]:
        previous = dict(self.ledger.items([product])).get(product, (ABSENT, frozenset()))
        self.ledger.in_flight(product)
        return previous

    def after(self, op: str, product: str, photos: list[Path], ok: bool, previous, reason: str = "") -> None:
        if ok:
            self.edits += 1
            if op == "add":
                self.ledger.ack_add(product, [p.name for p in photos] + list(previous[1]))
            else:
                self.ledger.ack_remove(product)
        else:  # told it failed: all or nothing means the product is as it was
            self.refused.append(f"{op} {product}: {reason}"[:300])
            with self.ledger.lock:
                self.ledger.expect[product] = previous

    def judge_mine(self) -> None:
        if self.judge is None:
            return
        verdict = self.judge.check(self.ledger, set(self.mine))
        self.verdict.merge(verdict)
        if verdict.loads:  # an edit that was in flight: whatever was done is now the state to keep
            for product, (state, _) in self.ledger.items(self.mine):
                if state == UNKNOWN:
                    names = verdict.observed.get(product, set())
                    with self.ledger.lock:
                        self.ledger.expect[product] = (PRESENT, frozenset(names)) if names else (ABSENT, frozenset())

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.round()
        except Exception as exc:  # a harness failure: reported, never hidden
            self.error = f"{type(exc).__name__}: {exc}"

    def round(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.thread.start()

    def kill_after(self, proc: subprocess.Popen, delay: float) -> threading.Timer:
        def kill():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)

        timer = threading.Timer(delay, kill)
        timer.daemon = True
        timer.start()
        return timer

    def summary(self) -> dict:
        return {
            "lane": self.name,
            "kind": self.kind,
            "kills": self.kills,
            "acknowledged": self.edits,
            "refused": len(self.refused),
            "server_5xx": self.server_errors,
            "error": self.error,
        }


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class WorkerLane(Lane):
    kind = "worker"

    def spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            _python("chaos.worker"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self.wd.env(),
            cwd=self.wd.root,
            text=True,
        )
        ready = proc.stdout.readline()
        if not ready:
            proc.wait()
            raise RuntimeError(f"chaos worker did not start (exit {proc.returncode})")
        return proc

    def command(self, proc: subprocess.Popen, argv: list[str]) -> dict | None:
        """The answer, or None if the process died first."""
        try:
            proc.stdin.write(json.dumps({"argv": argv}) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = proc.stdout.readline()
        return json.loads(line) if line else None

    def round(self) -> None:
        proc = self.spawn()
        kill = self.opts.get("kill", True)
        # one search first: the model's first-use costs are paid before the kill clock starts, so kills land in
        # edits (the CLI's own code: an engine opened per command, as `lookalike add` does)
        self.command(proc, ["search", str(self.wd.pool_photos(self.opts.get("pool", 16))[0])])
        timer = self.kill_after(proc, self.rng.uniform(0, self.opts.get("max_delay", 4.0))) if kill else None
        edits = self.opts.get("edits_per_round", 10**9)
        for _ in range(edits):
            if self.stop.is_set() and not kill:
                break
            op, product, photos = self.next_edit()
            previous = self.before(op, product)
            argv = ["add", product, *map(str, photos)] if op == "add" else ["remove", product]
            answer = self.command(proc, argv)
            if answer is None:
                break  # killed in flight: the product stays "unknown" until judged
            self.after(op, product, photos, answer["rc"] == 0, previous, answer.get("error", ""))
        if timer is not None:
            proc.wait()
            timer.cancel()
            if proc.returncode == -signal.SIGKILL:
                self.kills += 1
        else:
            self.quit(proc)
        self.judge_mine()

    def quit(self, proc: subprocess.Popen) -> None:
        try:
            proc.stdin.write(json.dumps({"quit": True}) + "\n")
            proc.stdin.close()
        except OSError:
            pass
        proc.wait(60)


class CliLane(Lane):
    """One real `lookalike` process per edit (the interpreter start included), killed at a random moment."""

    kind = "cli"

    def round(self) -> None:
        op, product, photos = self.next_edit()
        previous = self.before(op, product)
        argv = ["add", product, *map(str, photos)] if op == "add" else ["remove", product]
        proc = subprocess.Popen(
            _python("lookalike.cli", *argv),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.wd.env(),
            cwd=self.wd.root,
            text=True,
        )
        kill = self.opts.get("kill", True)
        timer = self.kill_after(proc, self.rng.uniform(0, self.opts.get("max_delay", 4.0))) if kill else None
        _, err = proc.communicate()
        if timer is not None:
            timer.cancel()
        if proc.returncode == -signal.SIGKILL:
            self.kills += 1
        else:
            self.after(op, product, photos, proc.returncode == 0, previous, (err or "").strip()[-300:])
        self.judge_mine()


class ServerLane(Lane):
    """`lookalike serve` and HTTP catalog changes; the server is killed at a random moment and started again."""

    kind = "server"

    def spawn(self) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen(
            _python("lookalike.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self.wd.env(),
            cwd=self.wd.root,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"lookalike serve exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        proc.kill()
        raise RuntimeError("lookalike serve was not ready within 120 s")

    def round(self) -> None:
        proc, url = self.spawn()
        kill = self.opts.get("kill", True)
        timer = self.kill_after(proc, self.rng.uniform(0, self.opts.get("max_delay", 6.0))) if kill else None
        edits = self.opts.get("edits_per_round", 10**9)
        with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
            for _ in range(edits):
                if self.stop.is_set() and not kill:
                    break
                op, product, photos = self.next_edit()
                previous = self.before(op, product)
                try:
                    if op == "add":
                        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
                        r = client.post(f"/products/{product}/images", files=files)
                    else:
                        r = client.delete(f"/products/{product}")
                except httpx.HTTPError:
                    break  # the server died with the request in flight
                if r.status_code >= 500 and r.status_code not in (503, 507):
                    self.server_errors += 1
                self.after(op, product, photos, 200 <= r.status_code < 300, previous, f"{r.status_code} {r.text}")
        if timer is not None:
            proc.wait()
            timer.cancel()
            if proc.returncode == -signal.SIGKILL:
                self.kills += 1
        else:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        self.judge_mine()


class SearchLane(WorkerLane):
    """Searches while the others write: every failure (an index that does not load, a missing file) is counted."""

    kind = "search"

    def round(self) -> None:
        proc = self.spawn()
        self.searches, self.failures = getattr(self, "searches", 0), getattr(self, "failures", [])
        photos = self.wd.pool_photos(self.opts.get("pool", 16))
        while not self.stop.is_set():
            answer = self.command(proc, ["search", str(self.rng.choice(photos)), "--json"])
            if answer is None:
                break
            self.searches += 1
            if answer["rc"] != 0:
                self.failures.append(answer.get("error", "")[-300:])
        self.quit(proc)

    def summary(self) -> dict:
        failures = getattr(self, "failures", [])
        return {**super().summary(), "searches": getattr(self, "searches", 0), "search_failures": len(failures)}
