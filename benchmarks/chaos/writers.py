"""Campaigns (a) kill -9 under writes and searches, and (b) concurrent writers.

(a) Several lanes write at once (long-running CLI workers, real CLI processes, a server taking HTTP edits) while a
    searcher runs; each writer process is killed with SIGKILL at a random moment and started again. After each
    kill the index must load, every acknowledged change must be there, and the folder, the cache and the index
    must agree on the products of the killed process; at the end, on every product.
(b) Rounds of two to four writers (CLI workers, a real CLI process, the server) each making one edit at the same
    moment; after each round every acknowledged change must be in the index.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx

from .common import PRESENT, SEED_IMAGES, SEED_PRODUCTS, Judge, Ledger, Verdict, make_workdir, timer
from .lanes import AUTH, CliLane, SearchLane, ServerLane, WorkerLane


def seed_ledger() -> Ledger:
    ledger = Ledger()
    for p in range(SEED_PRODUCTS):
        ledger.expect[f"seed-{p}"] = (PRESENT, frozenset(f"seed-{p}-{v}.jpg" for v in range(SEED_IMAGES)))
    return ledger


def _unique(lines: list[str]) -> list[str]:
    return sorted({line.split(":")[0] for line in lines})


def kill_campaign(
    root: Path,
    *,
    kills: int = 1000,
    workers: int = 3,
    cli: int = 1,
    server: int = 1,
    searchers: int = 1,
    max_seconds: float = 3600,
    seed: int = 0,
) -> dict:
    """Campaign (a). Stops at ``kills`` kills or after ``max_seconds``."""
    rng = random.Random(seed)
    wd = make_workdir(root)
    ledger, judge = seed_ledger(), Judge(wd)
    lanes = (
        [WorkerLane(f"w{i}", wd, ledger, judge, random.Random(rng.random())) for i in range(workers)]
        + [CliLane(f"c{i}", wd, ledger, judge, random.Random(rng.random())) for i in range(cli)]
        + [ServerLane(f"s{i}", wd, ledger, judge, random.Random(rng.random())) for i in range(server)]
    )
    search = [SearchLane(f"q{i}", wd, ledger, None, random.Random(rng.random())) for i in range(searchers)]
    with timer() as took:
        for lane in lanes + search:
            lane.start()
        deadline = time.monotonic() + max_seconds
        while sum(lane.kills for lane in lanes) < kills and time.monotonic() < deadline:
            if all(lane.error for lane in lanes):
                break
            time.sleep(0.2)
        for lane in lanes + search:
            lane.stop.set()
        for lane in lanes + search:
            lane.thread.join(600)
    final = judge.check(ledger)
    during = Verdict()
    for lane in lanes:
        during.merge(lane.verdict)
    total_kills = sum(lane.kills for lane in lanes)
    result = {
        "campaign": "kill",
        "kills": total_kills,
        "kills_by_kind": {k: sum(la.kills for la in lanes if la.kind == k) for k in ("worker", "cli", "server")},
        "acknowledged_changes": sum(lane.edits for lane in lanes),
        "refused_changes": sum(len(lane.refused) for lane in lanes),
        "lost_acknowledged": len(set(_unique(during.lost)) | set(_unique(final.lost))),
        "half_applied": len(set(_unique(during.half)) | set(_unique(final.half))),
        "cache_differs": len(set(_unique(during.cache_off)) | set(_unique(final.cache_off))),
        "index_loaded_every_time": during.loads and final.loads,
        "http_5xx": sum(lane.server_errors for lane in lanes),
        "searches": sum(getattr(s, "searches", 0) for s in search),
        "search_failures": sum(len(getattr(s, "failures", [])) for s in search),
        "products_checked_at_end": final.checked,
        "seconds": round(took["s"], 1),
        "seconds_per_kill": round(took["s"] / max(total_kills, 1), 2),
        "lanes": [lane.summary() for lane in lanes + search],
        "examples": {
            "lost": (during.lost + final.lost)[:10],
            "half_applied": (during.half + final.half)[:10],
            "cache_differs": (during.cache_off + final.cache_off)[:10],
            "refused": [r for lane in lanes for r in lane.refused][:10],
            "search_failures": [f for s in search for f in getattr(s, "failures", [])][:5],
            "load_error": during.load_error or final.load_error,
        },
    }
    return result


def writers_campaign(root: Path, *, rounds: int = 100, cli_every: int = 5, seed: int = 0) -> dict:
    """Campaign (b): each round two to four writers make one edit each at the same moment (a barrier); then every
    acknowledged change must be in the index. Writers: two CLI workers, the server, and every ``cli_every`` rounds
    a real CLI process."""
    rng = random.Random(seed)
    wd = make_workdir(root)
    ledger, judge = seed_ledger(), Judge(wd)
    w = [WorkerLane(f"w{i}", wd, ledger, judge, random.Random(rng.random()), kill=False) for i in range(2)]
    srv = ServerLane("s0", wd, ledger, judge, random.Random(rng.random()), kill=False)
    cli = CliLane("c0", wd, ledger, judge, random.Random(rng.random()), kill=False)
    procs = [lane.spawn() for lane in w]
    server, url = srv.spawn()
    client = httpx.Client(base_url=url, timeout=120, headers=AUTH)
    lost_rounds, lost, refused, http5xx = 0, [], [], 0
    mixes: dict[str, int] = {}

    def worker_edit(lane: WorkerLane, proc, barrier: threading.Barrier) -> None:
        op, product, photos = lane.next_edit()
        previous = lane.before(op, product)
        argv = ["add", product, *map(str, photos)] if op == "add" else ["remove", product]
        barrier.wait()
        answer = lane.command(proc, argv)
        lane.after(op, product, photos, bool(answer) and answer["rc"] == 0, previous, (answer or {}).get("error"))

    def server_edit(barrier: threading.Barrier) -> None:
        nonlocal http5xx
        op, product, photos = srv.next_edit()
        previous = srv.before(op, product)
        barrier.wait()
        if op == "add":
            r = client.post(f"/products/{product}/images", files=[("images", (p.name, p.read_bytes())) for p in photos])
        else:
            r = client.delete(f"/products/{product}")
        http5xx += r.status_code >= 500 and r.status_code not in (503, 507)
        srv.after(op, product, photos, 200 <= r.status_code < 300, previous, f"{r.status_code} {r.text}")

    def cli_edit(barrier: threading.Barrier) -> None:
        barrier.wait()
        cli.round()

    with timer() as took:
        for n in range(rounds):
            choice = ["w0", "w1", "server"] + (["cli"] if cli_every and n % cli_every == 0 else [])
            picked = rng.sample(choice, rng.randint(2, len(choice))) if len(choice) > 2 else choice
            mix = "+".join(sorted(picked))
            mixes[mix] = mixes.get(mix, 0) + 1
            barrier = threading.Barrier(len(picked))
            threads = []
            for name in picked:
                if name == "server":
                    target, args = server_edit, (barrier,)
                elif name == "cli":
                    target, args = cli_edit, (barrier,)
                else:
                    i = int(name[1])
                    target, args = worker_edit, (w[i], procs[i], barrier)
                threads.append(threading.Thread(target=target, args=args, daemon=True))
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            time.sleep(1.5)  # the server serves another process's commit after a delay; judge after it
            verdict = judge.check(ledger)
            if verdict.lost:
                lost_rounds += 1
                lost += verdict.lost
                for line in verdict.lost:  # count each loss once: the ledger takes what the index now says
                    product = line.split(":")[0]
                    names = verdict.observed.get(product, set())
                    ledger.expect[product] = (PRESENT, frozenset(names)) if names else ("absent", frozenset())
    client.close()
    for lane, proc in zip(w, procs):
        lane.quit(proc)
    server.send_signal(signal.SIGINT)
    server.wait(60)
    refused = [r for lane in (*w, srv, cli) for r in lane.refused]
    return {
        "campaign": "writers",
        "rounds": rounds,
        "acknowledged_changes": sum(lane.edits for lane in (*w, srv, cli)),
        "refused_changes": len(refused),
        "lost_acknowledged": len(lost),
        "rounds_with_a_loss": lost_rounds,
        "http_5xx": int(http5xx),
        "seconds": round(took["s"], 1),
        "mixes": mixes,
        "examples": {"lost": lost[:10], "refused": refused[:10]},
    }
