"""Claiming: priority order, queues, priority ranges, burst, and exactly-once under concurrency."""

import time

import dj
from tests.support_jobs import record


def runs(conn, marker_prefix=""):
    return [r[0] for r in conn.execute(
        "SELECT marker FROM test_runs WHERE marker LIKE %s ORDER BY at, job_id", (marker_prefix + "%",))]


def test_jobs_run_by_priority_then_run_at_then_id(conn, run_burst):
    record.using(priority=5).enqueue("p5-a")
    record.using(priority=0).enqueue("p0-a")
    record.using(priority=-3).enqueue("pminus3")
    record.using(priority=5).enqueue("p5-b")
    record.using(priority=0).enqueue("p0-b")
    run_burst(concurrency=1)
    assert runs(conn) == ["pminus3", "p0-a", "p0-b", "p5-a", "p5-b"]


def test_a_worker_takes_only_its_queues(conn, run_burst):
    record.using(queue="mail").enqueue("mail-1")
    record.using(queue="default").enqueue("default-1")
    record.using(queue="reports").enqueue("reports-1")
    run_burst(queues=("mail", "reports"))
    assert sorted(runs(conn)) == ["mail-1", "reports-1"]
    left = conn.execute("SELECT queue FROM jobs").fetchall()
    assert left == [("default",)]


def test_one_worker_on_several_queues_keeps_global_priority_order(conn, run_burst):
    record.using(queue="b", priority=2).enqueue("b2")
    record.using(queue="a", priority=3).enqueue("a3")
    record.using(queue="b", priority=1).enqueue("b1")
    record.using(queue="a", priority=0).enqueue("a0")
    run_burst(queues=("a", "b"), concurrency=1)
    assert runs(conn) == ["a0", "b1", "b2", "a3"]


def test_priority_range_filters_claims(conn, run_burst):
    for p in (-5, 0, 3, 10):
        record.using(priority=p).enqueue(f"p{p}")
    run_burst(("default",), 1, 2, "--min-priority", "0", "--max-priority", "3")
    assert sorted(runs(conn)) == ["p0", "p3"]
    assert sorted(r[0] for r in conn.execute("SELECT priority FROM jobs")) == [-5, 10]


def test_scheduled_jobs_wait_and_burst_exits_without_them(conn, run_burst):
    from datetime import datetime, timedelta, timezone

    record.using(run_at=datetime.now(timezone.utc) + timedelta(hours=1)).enqueue("later")
    record.enqueue("now")
    started = time.monotonic()
    run_burst()
    assert time.monotonic() - started < 30
    assert runs(conn) == ["now"]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_success_deletes_the_row_and_counts_it(conn, run_burst):
    ids = record.enqueue_many([(i,) for i in range(25)])
    assert len(ids) == 25
    run_burst()
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert dj.status(conn)["throughput"]["succeeded_last_minute"] == 25


def test_four_processes_run_twenty_thousand_jobs_exactly_once(conn, run_burst):
    ids = record.enqueue_many([(i,) for i in range(20_000)])
    assert len(set(ids)) == 20_000
    run_burst(("default",), 4, 8, timeout=600)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    total, distinct, pids = conn.execute(
        "SELECT count(*), count(DISTINCT job_id), count(DISTINCT pid) FROM test_runs").fetchone()
    assert (total, distinct) == (20_000, 20_000)
    assert pids > 1, "the work was not shared between processes"
    assert conn.execute("SELECT count(DISTINCT marker) FROM test_runs").fetchone()[0] == 20_000
