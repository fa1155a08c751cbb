"""Stall: a worker frozen with SIGSTOP past the lock timeout loses its jobs to another worker, and
what it does when it wakes up changes nothing (completions are fenced on id, attempt and worker)."""

import os
import signal
import socket

import psycopg
import pytest

from dj import sql
from tests.conftest import wait_for
from tests.support_jobs import record
from tests.support_reliability import RELIABILITY_ENV, gated, open_gate


def starts(conn):
    return {(m.removesuffix(":start"), a, p) for m, a, p in
            conn.execute("SELECT marker, attempt, pid FROM test_runs WHERE marker LIKE '%:start'")}


def row(conn, job_id):
    return conn.execute("SELECT attempts, locked_by, last_error, run_at, failed_at FROM jobs WHERE id = %s",
                        (job_id,)).fetchone()


def stats(conn):
    return conn.execute("SELECT coalesce(sum(succeeded), 0), coalesce(sum(failed), 0) FROM job_stats").fetchone()


def test_a_stalled_workers_late_success_and_failure_change_nothing(conn, worker_process, tmp_path):
    gate = str(tmp_path)
    # x: attempt 1 (worker A) succeeds late, while attempt 2 (worker B) still runs.
    # y: attempt 2 (worker B) fails at once; then attempt 1 (worker A) fails late.
    x = gated.enqueue("x", gate)
    y = gated.enqueue("y", gate, [1, 2])
    open_gate(gate, "y", 2)

    a = worker_process("--lock-timeout", "2", "--concurrency", "2", env=RELIABILITY_ENV)
    wait_for(lambda: starts(conn) == {("x", 1, a.pid), ("y", 1, a.pid)}, message="A to start both jobs")
    os.kill(a.pid, signal.SIGSTOP)  # its heartbeat thread freezes too
    try:
        b = worker_process("--lock-timeout", "2", "--concurrency", "2", env=RELIABILITY_ENV)
        b_name = f"{socket.gethostname()}:{b.pid}"
        wait_for(lambda: (row(conn, x)[:2] == (2, b_name) and row(conn, y)[:2] == (2, None)
                          and "y failed in attempt 2" in (row(conn, y)[2] or "")),
                 timeout=30, message="B to reclaim both jobs, fail y and keep running x")
        assert {("x", 2, b.pid), ("y", 2, b.pid)} <= starts(conn)
        x_before, y_before = row(conn, x), row(conn, y)
        assert stats(conn) == (0, 1)
        open_gate(gate, "x", 1)
        open_gate(gate, "y", 1)
    finally:
        os.kill(a.pid, signal.SIGCONT)

    # A wakes up and finishes both attempts; on SIGTERM it records every outcome before it exits.
    a.send_signal(signal.SIGTERM)
    assert a.wait(30) == 0, a.log()
    assert "1 succeeded, 1 failed, 0 dead" in a.log(), "A did send its late outcomes"

    assert row(conn, x) == x_before, "A's late success did not delete B's claim"
    assert row(conn, y) == y_before, "A's late failure overwrote nothing and counted no attempt"
    assert stats(conn) == (0, 1), "A's late outcomes were not counted"

    open_gate(gate, "x", 2)
    wait_for(lambda: row(conn, x) is None, message="B to finish x")
    assert stats(conn) == (1, 1)
    assert sorted((m, at) for m, at, _ in starts(conn)) == [("x", 1), ("x", 2), ("y", 1), ("y", 2)]
    assert b.poll() is None


@pytest.mark.parametrize("plan", ["force_generic_plan", "force_custom_plan"])
@pytest.mark.parametrize("size", [4, 200])
def test_a_flush_of_any_size_finishes_only_the_attempts_it_still_holds(db_url, conn, plan, size):
    """The worker sends small flushes as prepared statements (a generic plan) and large ones planned
    for their arrays (a custom plan); the fence must hold under both plans."""
    ids = record.enqueue_many([(i,) for i in range(2 * size)])
    conn.execute("UPDATE jobs SET locked_by = 'w', locked_at = now(), attempts = 1")
    # Lost since the claim, each way a fence can be broken: reclaimed by another worker (a later
    # attempt), released by the reaper (no holder), or reclaimed by this same worker (a later attempt).
    lost = {i: ("other", 2) for i in ids[::4]} | {i: (None, 1) for i in ids[1::4]} | {i: ("w", 2) for i in ids[2::4]}
    for i, (by, attempts) in lost.items():
        conn.execute("UPDATE jobs SET locked_by = %s, attempts = %s WHERE id = %s", (by, attempts, i))
    succeed, fail = ids[:size], ids[size:]
    with psycopg.connect(db_url, autocommit=True) as w:
        w.execute(f"SET plan_cache_mode = {plan}")
        for _ in range(2):  # the second run uses the prepared statement
            w.execute(sql.COMPLETE, {"ids": succeed, "attempts": [1] * size, "seconds": [0.01] * size,
                                     "worker": "w"}, prepare=True).fetchall()
            w.execute(sql.FAIL, {"ids": fail, "attempts": [1] * size, "errors": ["boom"] * size,
                                 "delays": [60.0] * size, "dead": [False] * size, "seconds": [0.01] * size,
                                 "worker": "w"}, prepare=True).fetchall()
    rows = {i: (a, by, err) for i, a, by, err in conn.execute("SELECT id, attempts, locked_by, last_error FROM jobs")}
    assert set(rows) == set(lost) | (set(fail) - set(lost)), "exactly the held successes were deleted"
    assert all(rows[i] == (a, by, None) for i, (by, a) in lost.items()), "lost attempts were left alone"
    assert all(rows[i] == (1, None, "boom") for i in set(fail) - set(lost)), "held failures were recorded"
    assert stats(conn) == (len(set(succeed) - set(lost)), len(set(fail) - set(lost)))


@pytest.mark.parametrize("size", [4, 200])
def test_a_release_hands_back_only_the_attempts_it_still_holds(db_url, conn, size):
    ids = record.enqueue_many([(i,) for i in range(size)])
    conn.execute("UPDATE jobs SET locked_by = 'w', locked_at = now(), attempts = 1")
    lost = {i: ("other", 2) for i in ids[::3]} | {i: (None, 1) for i in ids[1::3]}
    for i, (by, attempts) in lost.items():
        conn.execute("UPDATE jobs SET locked_by = %s, attempts = %s WHERE id = %s", (by, attempts, i))
    with psycopg.connect(db_url, autocommit=True) as w:
        w.execute(sql.RELEASE, {"ids": ids, "attempts": [1] * size, "started": [False] * size, "worker": "w"})
    rows = {i: (by, a) for i, by, a in conn.execute("SELECT id, locked_by, attempts FROM jobs")}
    assert all(rows[i] == lost[i] for i in lost), "lost attempts were left alone"
    assert all(rows[i] == (None, 0) for i in set(ids) - set(lost)), "held jobs went back, attempt undone"


@pytest.mark.parametrize("statement", ["COMPLETE", "FAIL", "RELEASE"])
def test_a_flush_reads_its_outcomes_once_whatever_the_statistics_say(db_url, conn, statement):
    """Statistics taken with the queue at rest say nothing is locked. A plan built on them once
    scanned the worker's locked rows and, for each, every outcome again: quadratic, 50-190 ms per
    flush in a drain of a 1M backlog. Each outcome list must be read once, and each job found by id."""
    record.enqueue_many([(i,) for i in range(20_000)])
    conn.execute("ANALYZE jobs")
    ids = [r[0] for r in conn.execute(
        "UPDATE jobs SET locked_by = 'w', locked_at = now(), attempts = 1"
        " WHERE id IN (SELECT id FROM jobs ORDER BY id LIMIT 1500) RETURNING id")]
    n = len(ids)
    params = {"ids": "{" + ",".join(map(str, ids)) + "}", "attempts": [1] * n, "seconds": [0.01] * n,
              "errors": ["boom"] * n, "delays": [60.0] * n, "dead": [False] * n, "started": [False] * n,
              "worker": "w"}
    with psycopg.connect(db_url) as w:
        plan = w.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + getattr(sql, statement), params).fetchone()[0]
        w.rollback()

    def nodes(node):
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    every = list(nodes(plan[0]["Plan"]))
    outcome_reads = [n for n in every if n["Node Type"] in ("Function Scan", "CTE Scan")
                     and n.get("Alias") in ("d", "d_1", "f", "f_1", "r", "r_1")]
    assert outcome_reads, "the plan reads the outcomes"
    assert all(n["Actual Loops"] == 1 for n in outcome_reads), [
        (n["Node Type"], n.get("Alias"), n["Actual Loops"]) for n in outcome_reads]
    scans = {n.get("Index Name") or n["Node Type"] for n in every if n.get("Relation Name") == "jobs"}
    assert "jobs_running_idx" not in scans, scans
