"""Per-key limits (@job(limit_by=..., limit=N)) with several real worker processes: the limit is
never exceeded, other keys are not held back, limit=1 keeps enqueue order, a kill -9 frees the
key's slot, one tenant's backlog does not hold back another, and --burst waits for a held key
without spinning. Every job records its start and end (tests/support_keys.py) and the checks are
made on those times."""

from __future__ import annotations

import json
import os
import resource
import signal
import time
import warnings
from collections import defaultdict

import pytest

import tests.support_keys as keys
from tests.conftest import wait_for



@pytest.fixture(autouse=True)
def keyed_tasks(monkeypatch):
    """The workers these tests start import the keyed tasks too."""
    monkeypatch.setenv("DJ_TASKS", "tests.support_jobs,tests.support_async,tests.support_keys")


def runs(conn) -> dict[str, dict[str, list]]:
    """{tenant: {marker: [start, end]}} from what the jobs recorded (the last attempt's times)."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [None, None]))
    for marker, at in conn.execute("SELECT marker, at FROM test_runs ORDER BY at").fetchall():
        tenant, name, edge = marker.split(":")
        out[tenant][name][0 if edge == "start" else 1] = at.timestamp()
    return out


def most_at_once(intervals: list[list]) -> int:
    """The largest number of the (start, end) intervals that overlap at any moment."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_the_limit_is_never_exceeded_and_other_keys_run_alongside(conn, run_burst):
    for tenant in ("a", "b", "c"):
        keys.three.enqueue_many([(tenant, f"{tenant}{i}", 0.05) for i in range(24)])
    run_burst(("default",), 3, 4)
    done = runs(conn)
    assert sorted(done) == ["a", "b", "c"]
    everything = []
    for tenant, jobs in done.items():
        assert len(jobs) == 24 and all(s and e for s, e in jobs.values()), jobs
        assert most_at_once(list(jobs.values())) <= 3, tenant
        everything += list(jobs.values())
    # 12 threads over 3 processes and three keys of 3: the keys ran side by side.
    assert most_at_once(everything) > 3
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_limit_one_runs_each_key_one_at_a_time_in_enqueue_order(conn, run_burst):
    for i in range(15):
        for tenant in ("x", "y"):
            keys.one.enqueue(tenant, f"{i:02d}", 0.01)
    run_burst(("default",), 2, 4)
    done = runs(conn)
    for tenant in ("x", "y"):
        jobs = done[tenant]
        assert len(jobs) == 15
        by_start = sorted(jobs, key=lambda m: jobs[m][0])
        assert by_start == sorted(jobs), f"{tenant} started out of order: {by_start}"
        # Strictly one after another: each starts after the one before it ended.
        for prev, nxt in zip(by_start, by_start[1:]):
            assert jobs[nxt][0] >= jobs[prev][1], (tenant, prev, nxt)


def test_a_worker_killed_with_sigkill_frees_its_keys_slot(conn, worker_process):
    first = keys.hang_first.enqueue("k", "first")
    keys.hang_first.enqueue("k", "second")
    victim = worker_process("--lock-timeout", "2")
    wait_for(lambda: conn.execute("SELECT 1 FROM test_runs WHERE marker = 'k:first:start'").fetchone(),
             message="the first job of key k to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    # While the dead worker's attempt holds the slot, nothing else of key k may start.
    worker_process("--lock-timeout", "2")
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0, timeout=60,
             message="both jobs of key k to finish after the reaper freed the slot")
    rows = conn.execute("SELECT marker, attempt, at FROM test_runs WHERE job_id = %s OR marker LIKE 'k:second%%' "
                        "ORDER BY at", (first,)).fetchall()
    markers = [(m, a) for m, a, _ in rows]
    # The first job ran again (its key's head) before the second started.
    assert markers == [("k:first:start", 1), ("k:first:start", 2), ("k:first:end", 2),
                       ("k:second:start", 1), ("k:second:end", 1)], markers


def test_a_tenants_backlog_does_not_hold_back_another_tenant(conn, worker_process):
    keys.three.enqueue_many([("big", f"b{i}", 0.02) for i in range(3000)])  # ~20 s at its limit of 3
    for _ in range(2):
        worker_process("--concurrency", "4")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs").fetchone()[0] > 10,
             message="the big tenant's jobs to start")
    started = time.time()
    keys.three.enqueue_many([("small", f"s{i}", 0.02) for i in range(30)])
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs WHERE marker LIKE 'small:%%:start'"
                                  ).fetchone()[0] == 30, timeout=30, message="the small tenant's 30 jobs to start")
    last = conn.execute("SELECT max(at) FROM test_runs WHERE marker LIKE 'small:%%:start'").fetchone()[0]
    assert last.timestamp() - started < 5.0
    # ... while most of the big tenant's backlog was still waiting.
    assert conn.execute("SELECT count(*) FROM jobs WHERE limit_key = 'keys.three:big'").fetchone()[0] > 1500


def test_burst_waits_for_a_key_held_by_another_worker_without_spinning(conn, worker_process, cli):
    keys.one.enqueue("h", "running", 4.0)
    holder = worker_process()
    wait_for(lambda: conn.execute("SELECT 1 FROM test_runs WHERE marker = 'h:running:start'").fetchone(),
             message="the holder to start the key's first job")
    keys.one.enqueue("h", "held", 0.0)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = cli("work", "--burst", "--queues", "default", timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert result.returncode == 0, result.stderr
    done = runs(conn)["h"]
    # It did not exit while the held job could still run, and it ran it once the key was free.
    assert done["held"][0] is not None and done["held"][0] >= done["running"][1]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    # It waited (for the completion's NOTIFY) instead of claiming in a loop: its CPU time over the
    # ~4 s wait is about what starting Python and dj costs.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 2.5, cpu
    holder.send_signal(signal.SIGTERM)
    holder.wait(30)


def test_burst_exits_when_no_keyed_job_is_left(conn, run_burst):
    keys.one.enqueue("e", "only", 0.0)
    started = time.monotonic()
    run_burst(("default",), 1, 2)
    assert time.monotonic() - started < 30
    assert runs(conn)["e"]["only"][1] is not None


def test_a_failed_attempt_frees_the_slot_and_the_retry_waits_its_turn(conn, worker_process):
    keys.fail_first.enqueue("f", "flaky")
    keys.one.enqueue("f", "next", 0.0)
    worker_process()
    wait_for(lambda: conn.execute("SELECT 1 FROM test_runs WHERE marker = 'f:next:end'").fetchone(),
             message="the next job of key f to run while the failed one waits for its retry")
    row = conn.execute("SELECT attempts, run_at > now() FROM jobs WHERE limit_key = 'keys.fail_first:f'").fetchone()
    assert row == (1, True)


def test_status_metrics_and_dashboard_show_the_keys_at_their_limit(conn, db_url, worker_process, cli):
    keys.one.enqueue("s", "running", 30.0)
    worker_process()
    wait_for(lambda: conn.execute("SELECT 1 FROM test_runs WHERE marker = 's:running:start'").fetchone(),
             message="the key's first job to start")
    keys.one.enqueue_many([("s", f"w{i}", 0.0) for i in range(5)])
    result = cli("status", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["keys_at_limit"] == [{"key": "keys.one:s", "queue": "default", "running": 1, "limit": 1, "held": 5}]
    assert doc["totals"]["ready"] == 5 and doc["totals"]["running"] == 1
    text = cli("status")
    assert "keys.one:s" in text.stdout, text.stdout
    with warnings.catch_warnings():  # as in test_web: Starlette would rather have httpx2
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from dj.web.app import create_app

    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        metrics = client.get("/metrics").text
        assert "dj_keys_at_limit 1.0" in metrics
        assert 'dj_key_held_jobs{key="keys.one:s",queue="default"} 5.0' in metrics
        fragment = client.get("/fragments/queues").text
        assert 'data-key="keys.one:s"' in fragment and "Keys at their limit" in fragment


@pytest.mark.no_database
def test_limit_options_are_checked():
    from dj import job

    with pytest.raises(ValueError, match="limit needs limit_by"):
        job(limit=2)
    with pytest.raises(ValueError, match="at least 1"):
        job(limit_by=lambda x: x, limit=0)
    with pytest.raises(TypeError, match="set them on @job"):
        keys.one.using(limit=3)
    assert keys.one.options.limit == 1 and keys.three.options.limit == 3


def _claim_params(worker: str) -> dict:
    return {"queues": ["default"], "min_priority": -32768, "max_priority": 32767, "limit": 10, "worker": worker,
            "after_priority": [-32768], "after_micros": [None], "after_id": [None]}


def test_keys_with_any_characters_are_claimed_once_and_a_stale_setting_is_harmless(conn):
    from dj import sql

    odd = 'a,b{"c}\\ d'
    keys.three.enqueue_many([(odd, f"m{i}") for i in range(5)])
    with conn.transaction():
        conn.execute(sql.LOCK_KEYS, {"queues": ["default"], "after_key": None, "max_keys": 50})
        claimed = conn.execute(sql.CLAIM, _claim_params("t1")).fetchall()
    assert len(claimed) == 3  # the key's limit, whatever its characters
    # Behind a transaction pooler, a server connection that served a keyed claim serves another
    # client next: the transaction-local setting is gone, and a claim that looks for no keys must
    # neither fail nor claim keyed jobs.
    with conn.transaction():
        assert conn.execute(sql.CLAIM, _claim_params("t2")).fetchall() == []
    with conn.transaction():
        conn.execute(sql.LOCK_KEYS, {"queues": ["default"], "after_key": None, "max_keys": 50})
        assert conn.execute(sql.CLAIM, _claim_params("t3")).fetchall() == []  # still 3 running


def test_a_queues_concurrency_limit_counts_keyed_and_plain_jobs_together(conn):
    from dj import admin, sql
    from tests.support_jobs import record

    admin.set_concurrency_limit(conn, "default", 4)
    for tenant in ("p", "q", "r"):
        keys.three.enqueue_many([(tenant, f"m{i}") for i in range(3)])
    record.enqueue_many([(f"plain{i}",) for i in range(5)])
    with conn.transaction():
        conn.execute(sql.LOCK_LIMITED_QUEUES, {"queues": ["default"]})
        conn.execute(sql.LOCK_KEYS, {"queues": ["default"], "after_key": None, "max_keys": 50})
        claimed = conn.execute(sql.CLAIM, _claim_params("t1")).fetchall()
    assert len(claimed) == 4
    with conn.transaction():
        conn.execute(sql.LOCK_LIMITED_QUEUES, {"queues": ["default"]})
        conn.execute(sql.LOCK_KEYS, {"queues": ["default"], "after_key": None, "max_keys": 50})
        assert conn.execute(sql.CLAIM, _claim_params("t2")).fetchall() == []


def test_keyed_dependents_wait_for_their_dependency_then_keep_to_their_keys_limit(conn, run_burst):
    first = keys.one.enqueue("t", "00", 0.2)
    # Waiting for `first`, in t's key (limit 1), beside a ready job of another key.
    after = keys.one.using(after=[first]).enqueue_many([("t", f"{i:02d}", 0.05) for i in range(1, 4)])
    other = keys.one.using(after=[first]).enqueue("u", "00", 0.0)
    assert conn.execute("SELECT count(*) FROM jobs WHERE run_at = 'infinity' AND limit_key IS NOT NULL"
                        ).fetchone()[0] == 4
    run_burst(("default",), 2, 4)
    done = runs(conn)
    t = done["t"]
    assert len(t) == 4 and done["u"]["00"][0] >= t["00"][1]
    # Released together, they still run one at a time under t's limit of 1.
    by_start = sorted(t, key=lambda m: t[m][0])
    assert by_start[0] == "00"
    for prev, nxt in zip(by_start, by_start[1:]):
        assert t[nxt][0] >= t[prev][1], (prev, nxt)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert len(after) == 3 and other
