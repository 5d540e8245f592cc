"""The chaos suite, short (benchmarks/chaos; `make chaos` runs the long one): the promises of docs/reliability.md on a
few kills, rounds and faults with the tiny test backbone. Subprocesses get it by name (test_tiny is registered in
the library) through LOOKALIKE_* variables and PYTHONPATH set by the harness.
"""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from chaos.common import PRESENT, Judge, Ledger, make_workdir  # noqa: E402
from chaos.faults import Injector, fault_campaign  # noqa: E402
from chaos.fuzz import hostile, http_fuzz, mutate, seeds  # noqa: E402
from chaos.writers import kill_campaign, seed_ledger, writers_campaign  # noqa: E402

# --- the harness itself notices what it must notice ----------------------------------------------------------


def test_the_judge_sees_a_half_applied_edit_and_a_lost_one(tmp_path):
    wd = make_workdir(tmp_path)
    judge = Judge(wd)
    ledger = seed_ledger()
    assert judge.check(ledger).half == [] and judge.check(ledger).lost == []
    shutil.copytree(wd.catalog / "seed-0", wd.catalog / "copied-not-indexed")  # files in, index not updated
    ledger.ack_add("copied-not-indexed", ["seed-0-0.jpg"])
    verdict = judge.check(ledger)
    assert [h.split(":")[0] for h in verdict.half] == ["copied-not-indexed"]
    assert [h.split(":")[0] for h in verdict.lost] == ["copied-not-indexed"]
    ledger.ack_remove("seed-1")  # acknowledged, but still in the index
    assert "seed-1" in [h.split(":")[0] for h in judge.check(ledger).lost]


def test_the_injector_fails_exactly_the_nth_write(tmp_path):
    counter = Injector()
    with counter.active():
        (tmp_path / "a").write_bytes(b"1")
        (tmp_path / "a").rename(tmp_path / "b")
        (tmp_path / "b").read_bytes()  # a read is not a write
    assert counter.count == 2
    inj = Injector(errno.ENOSPC, 2)
    with inj.active(), pytest.raises(OSError) as failed:
        (tmp_path / "c").write_bytes(b"1")
        (tmp_path / "c").rename(tmp_path / "d")
    assert failed.value.errno == errno.ENOSPC and inj.fired == "os.rename"
    assert (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_mutations_are_varied():
    import random

    corpus = seeds()
    assert len({mutate(corpus[0], random.Random(i)) for i in range(50)}) > 30


# --- the campaigns, short -------------------------------------------------------------------------------------


def test_disk_full_and_read_only_at_every_write_leave_nothing_half_done(tmp_path):
    r = fault_campaign(tmp_path, codes=(errno.ENOSPC,))  # `make chaos` adds EROFS
    assert r["runs"] > 50 and r["http_500"] == 0, r["examples"]
    assert r["half_applied"] == 0, r["examples"]["problems"]
    assert r["cache_differs"] == 0, r["examples"]["problems"]


def test_two_to_four_writers_lose_no_acknowledged_change(tmp_path):
    r = writers_campaign(tmp_path, rounds=3, cli_every=0)  # CLI workers + server; real CLI processes: test_kill
    assert r["acknowledged_changes"] >= 6 and r["http_5xx"] == 0
    assert r["lost_acknowledged"] == 0, r["examples"]


def test_kill_9_under_writes_and_searches(tmp_path):
    r = kill_campaign(tmp_path, kills=5, workers=2, cli=1, server=1, searchers=1, max_seconds=150)
    assert r["kills"] >= 5 and not any(lane["error"] for lane in r["lanes"]), r["lanes"]
    assert r["index_loaded_every_time"], r["examples"]["load_error"]
    assert r["http_5xx"] == 0 and r["search_failures"] == 0, r["examples"]
    assert r["lost_acknowledged"] == 0, r["examples"]["lost"]
    assert r["half_applied"] == 0, r["examples"]["half_applied"]


def test_fuzzed_and_hostile_uploads_never_get_a_5xx(tmp_path):
    workdir = make_workdir(tmp_path)
    r = http_fuzz(tmp_path, requests=800, seed=1, wd=workdir)
    assert r["http_5xx"] == 0 and r["crashes"] == 0, r["examples"]
    assert set(r["statuses"]) >= {"200", "415", "422"}  # the mutations reach the decoder, not just the parser
    h = hostile(tmp_path, wd=workdir)
    assert h["http_5xx"] == 0 and h["written_outside_catalog"] == [], h


def test_the_decoder_under_atheris():
    pytest.importorskip("atheris", reason="atheris (dev extra) is not installed")
    from chaos.fuzz import atheris_decode

    r = atheris_decode(300, seconds=60)
    assert r["exit_status"] == 0 and r["inputs"] >= 300, r["log_tail"]


def test_the_seed_ledger_matches_the_seed_catalog(tmp_path):
    workdir = make_workdir(tmp_path)
    ledger = seed_ledger()
    assert all(state == PRESENT for _, (state, _) in ledger.items())
    assert Judge(workdir).check(ledger).lost == [] and Judge(workdir).check(Ledger()).checked == 0


def test_atheris_finding_a_truncated_png_header_is_an_image_error():
    """Found by `make chaos` (atheris): Pillow's PNG parser raised ValueError out of open_image."""
    import base64

    from lookalike.imaging import ImageError, open_image

    data = base64.b64decode("iVBORw0KGgoAAAAFSUhEUgAA6mAAAOpgCAIAAAAPsA==")
    with pytest.raises(ImageError) as err:
        open_image(data, 4_000_000, draft_size=64)
    assert "unreadable image header" in err.value.reason
