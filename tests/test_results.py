"""Kept successes (issue 15, "Results and history"): keep= on @job and using(), the job_results table
that COMPLETE_KEEP moves them to, dj.result() / dj.result_async() with real worker processes,
pruning, and the history in the CLI, `dj status` and /metrics. The dashboard's History page is in
test_web.py's neighbour below (test_history_page_*)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import dj
from dj import pruning
from tests.conftest import wait_for
from tests.support_results import (RESULT_TASKS, async_total, kept_failure, plain_total, returns_nothing_json,
                                   returns_too_much, slow_total, total)


def burst(cli, processes: int = 2, *extra: str) -> None:
    result = cli("work", "--burst", "--processes", str(processes), "--concurrency", "4", *extra, env=RESULT_TASKS)
    assert result.returncode == 0, result.stderr


def test_keep_takes_seconds_or_a_timedelta_and_refuses_anything_else():
    assert total.options.keep == 3600 and async_total.options.keep == 3600
    assert plain_total.options.keep is None
    assert plain_total.using(keep=timedelta(minutes=2)).options.keep == 120
    assert plain_total.using(keep=1.5).options.keep == 1.5
    assert total.using(keep=None).options.keep is None  # a kept task, enqueued without keeping
    for bad in (0, -1, "1h", True, float("inf"), timedelta(0)):
        with pytest.raises(ValueError, match="keep must be"):
            plain_total.using(keep=bad)
        with pytest.raises(ValueError, match="keep must be"):
            dj.job(name=f"test.bad_keep_{bad!r}", keep=bad)(lambda: None)


def test_kept_results_from_several_workers_and_plain_successes_still_deleted(db_url, conn, cli):
    kept = [total.enqueue(i, i) for i in range(300)]
    kept += async_total.enqueue_many([(i, 1) for i in range(100)])
    kept.append(plain_total.using(keep=60).enqueue(20, 22))
    plain = plain_total.enqueue_many([(i, i) for i in range(200)])  # keep off: deleted as before
    burst(cli, 2)

    values = [dj.result(job_id, timeout=5) for job_id in kept]
    assert [v["sum"] for v in values[:300]] == [2 * i for i in range(300)]
    # Computed in the worker processes (which of the two got how many depends on their start-up).
    assert os.getpid() not in {v["pid"] for v in values[:300]}
    assert values[300:400] == [[i + 1, job_id] for i, job_id in enumerate(kept[300:400])]
    assert values[400] == 42
    # Nothing finished stays in the hot table; only the kept ones are in job_results.
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    rows = conn.execute("SELECT id, task, attempts, run_seconds, finished_at, expires_at - finished_at, run_at, "
                        "created_at FROM job_results ORDER BY id").fetchall()
    assert [r[0] for r in rows] == sorted(kept)
    for job_id, task, attempts, seconds, finished_at, kept_for, run_at, created_at in rows:
        assert attempts == 1 and 0 <= seconds < 5 and finished_at >= run_at >= created_at
        assert kept_for == (timedelta(minutes=1) if task == "test.plain_total" else timedelta(hours=1))
    with pytest.raises(LookupError, match="no job"):
        dj.result(plain[0])  # a success that was not kept is gone, as in DelayedJob
    assert conn.execute("SELECT sum(succeeded) FROM job_stats").fetchone()[0] == 601


def test_result_waits_for_a_running_worker_and_wakes_on_notify(db_url, worker_process, monkeypatch):
    # No fallback poll within the test's time: where LISTEN works, only the NOTIFY can end the wait
    # in time (behind PgBouncer, test_pgbouncer.py runs this again, and it polls instead).
    monkeypatch.setattr(dj.results, "POLL_WITH_LISTEN", 120.0)
    worker = worker_process("--concurrency", "2", env=RESULT_TASKS)
    worker.wait_for_log("started")
    job_id = slow_total.enqueue(40, 2, seconds=0.3)
    started = time.monotonic()
    assert dj.result(job_id, timeout=20) == 42
    waited = time.monotonic() - started
    assert 0.3 <= waited < 5
    # Many waiters at once, each woken by its own job's NOTIFY.
    ids = [slow_total.enqueue(i, 0, seconds=0.05) for i in range(8)]
    out: dict[int, object] = {}
    threads = [threading.Thread(target=lambda j=j: out.__setitem__(j, dj.result(j, timeout=30))) for j in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert [out[j] for j in ids] == list(range(8))


def test_result_async_waits_on_the_event_loop(db_url, worker_process, monkeypatch):
    monkeypatch.setattr(dj.results, "POLL_WITH_LISTEN", 120.0)  # as above: the NOTIFY must wake it
    worker = worker_process("--concurrency", "2", env=RESULT_TASKS)
    worker.wait_for_log("started")

    async def main():
        ids = [await async_total.enqueue_async(i, 10) for i in range(5)]
        ids.append(await slow_total.using(queue="default").enqueue_async(1, 2, seconds=0.2))
        ticks = 0

        async def ticker():  # the loop stays free while result_async waits
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        values = await asyncio.gather(*(dj.result_async(j, timeout=20) for j in ids))
        t.cancel()
        return ids, values, ticks

    ids, values, ticks = asyncio.run(main())
    assert values[:5] == [[i + 10, j] for i, j in enumerate(ids[:5])]
    assert values[5] == 3 and ticks > 5


def test_a_dead_job_raises_job_dead_with_its_last_error(db_url, cli, worker_process):
    worker = worker_process("--concurrency", "2", env=RESULT_TASKS)
    worker.wait_for_log("started")
    job_id = kept_failure.enqueue("k1")
    with pytest.raises(dj.JobDead) as raised:
        dj.result(job_id, timeout=20)
    assert raised.value.job_id == job_id
    assert "ValueError: kept job k1 failed" in raised.value.error
    assert "kept job k1 failed" in str(raised.value)

    async def waits():
        return await dj.result_async(job_id, timeout=5)

    with pytest.raises(dj.JobDead):
        asyncio.run(waits())


def test_a_dependent_killed_or_cancelled_ends_a_result_wait_at_once(db_url, conn, cli, worker_process, monkeypatch):
    # Only a NOTIFY can end these waits in time: the fallback poll is pushed past the test.
    monkeypatch.setattr(dj.results, "POLL_WITH_LISTEN", 120.0)
    worker = worker_process("--concurrency", "2", env=RESULT_TASKS)
    worker.wait_for_log("started")
    doomed = kept_failure.using(run_at=datetime.now(timezone.utc) + timedelta(seconds=1)).enqueue("dep")
    dependent = total.using(after=[doomed]).enqueue(1, 2)  # dies with `doomed`, in dj_settle_dependents
    started = time.monotonic()
    with pytest.raises(dj.JobDead, match=f"dependency job {doomed} is dead"):
        dj.result(dependent, timeout=30)
    assert time.monotonic() - started < 15

    later = total.using(run_at=datetime.now(timezone.utc) + timedelta(hours=1)).enqueue(3, 4)
    threading.Timer(0.5, lambda: cli("jobs", "cancel", str(later))).start()
    started = time.monotonic()
    with pytest.raises(LookupError, match=f"no job {later}"):
        dj.result(later, timeout=30)
    assert time.monotonic() - started < 15


def test_a_death_by_the_reaper_is_announced_to_result_waiters(db_url, conn):
    from dj import sql

    job_id = kept_failure.enqueue("orphan")
    # As a worker that took its last attempt and vanished: locked long ago, by no live worker.
    conn.execute("UPDATE jobs SET locked_by = 'gone', locked_at = now() - interval '1 hour', attempts = 1 "
                 "WHERE id = %s", (job_id,))
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN " + sql.RESULTS_CHANNEL)
        conn.execute(sql.REAP_ORPHANS, {"lock_timeout": 1})
        told = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert told == [str(job_id)]
    with pytest.raises(dj.JobDead, match="stopped heartbeating"):
        dj.result(job_id, timeout=5)


def test_a_kept_dependent_keeps_its_result(conn, cli):
    first = total.enqueue(1, 1)
    second = total.using(after=[first]).enqueue(2, 2)
    burst(cli, 2)
    assert dj.result(first, timeout=5)["sum"] == 2 and dj.result(second, timeout=5)["sum"] == 4


def test_unknown_not_kept_and_timed_out(db_url):
    with pytest.raises(LookupError, match="no job 123456"):
        dj.result(123456)
    with pytest.raises(LookupError):
        asyncio.run(dj.result_async(123456))
    pending = plain_total.enqueue(1, 1)  # no worker runs: it stays queued
    with pytest.raises(dj.ResultNotKept, match="without keep"):  # at once, not after a wait
        dj.result(pending)
    assert issubclass(dj.ResultNotKept, LookupError)
    waiting = total.enqueue(1, 1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        dj.result(waiting, timeout=0.3)
    with pytest.raises(TimeoutError):
        asyncio.run(dj.result_async(waiting, timeout=0.3))
    assert time.monotonic() - started < 5


def test_a_return_value_that_cannot_be_kept_still_succeeds_and_says_why(db_url, conn, cli):
    not_json, too_big = returns_nothing_json.enqueue(), returns_too_much.enqueue()
    burst(cli, 1)
    with pytest.raises(dj.ResultError, match="JSON-serialisable"):
        dj.result(not_json, timeout=5)
    with pytest.raises(dj.ResultError, match="limit is 1 MB"):
        dj.result(too_big, timeout=5)
    rows = conn.execute("SELECT result, result_error IS NOT NULL FROM job_results ORDER BY id").fetchall()
    assert rows == [(None, True), (None, True)]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # succeeded, not dead


def test_expired_results_are_pruned_by_a_running_worker(db_url, conn, worker_process):
    short = total.using(keep=0.5)
    ids = [short.enqueue(i, 0) for i in range(5)]
    long = total.enqueue(7, 0)
    worker = worker_process("--concurrency", "2", env=RESULT_TASKS)
    assert dj.result(long, timeout=20)["sum"] == 7
    wait_for(lambda: conn.execute("SELECT count(*) FROM job_results").fetchone()[0] == 1, timeout=30,
             message="the expired results to be pruned")
    for job_id in ids:
        with pytest.raises(LookupError, match="pruned"):
            dj.result(job_id)
    assert dj.result(long)["sum"] == 7
    runs, holder = conn.execute("SELECT runs, holder FROM maintenance WHERE name = 'prune results'").fetchone()
    assert runs >= 1 and holder == conn.execute("SELECT name FROM workers").fetchone()[0]
    assert worker.poll() is None


def test_pruning_goes_in_small_batches_one_worker_at_a_time(db_url, conn, cli):
    ids = total.enqueue_many([(i, i) for i in range(25)])
    burst(cli, 1)
    conn.execute("UPDATE job_results SET expires_at = now() - interval '1 second' WHERE id = ANY(%s)",
                 (ids[:23],))
    with psycopg.connect(db_url, autocommit=True) as a, psycopg.connect(db_url, autocommit=True) as b:
        assert pruning.prepare(a)  # what a worker does as it starts (tests empty the maintenance table)
        assert pruning.take(a, "worker-a")
        assert not pruning.take(b, "worker-b")  # the lease is held
        # Each batch is its own transaction: watch the deletes land one batch at a time.
        seen = []
        original = pruning.sql.PRUNE_RESULTS

        class Spy:
            def execute(self, statement, params=None):
                result = a.execute(statement, params)
                if statement == original:
                    seen.append(b.execute("SELECT count(*) FROM job_results").fetchone()[0])
                return result

        assert pruning.run(Spy(), "worker-a", batch=10) == (23, 3)  # type: ignore[arg-type]
        assert seen == [15, 5, 2]  # another session saw each batch committed before the next
        assert not pruning.take(b, "worker-b")  # nothing has expired any more
    assert sorted(r[0] for r in conn.execute("SELECT id FROM job_results")) == ids[23:]
    assert conn.execute("SELECT holder, runs FROM maintenance WHERE name = 'prune results'").fetchone() == (
        "worker-a", 1)


def test_a_long_history_is_counted_up_to_a_cap_then_estimated(conn, monkeypatch):
    from dj import admin, history

    conn.execute("""INSERT INTO job_results (id, queue, priority, task, args, kwargs, attempts, max_attempts,
                                             created_at, run_at, finished_at, expires_at, run_seconds)
                    SELECT i, CASE WHEN i % 4 = 0 THEN 'reports' ELSE 'default' END, 0, 'test.total', '[]', '{}',
                           1, 25, now(), now(), now(), now() + interval '1 hour', 0.01
                    FROM generate_series(1, 20000) AS i""")
    conn.execute("ANALYZE job_results")
    exact = admin.status(conn)["succeeded"]
    assert exact == {"total": 20000, "queues": {"default": 15000, "reports": 5000}, "estimated": False}
    monkeypatch.setattr(history, "COUNT_CAP", 1000)
    # Grown since the ANALYZE: the estimate follows the table's size, not the stale statistics.
    conn.execute("""INSERT INTO job_results (id, queue, priority, task, args, kwargs, attempts, max_attempts,
                                             created_at, run_at, finished_at, expires_at, run_seconds)
                    SELECT id + 20000, queue, priority, task, args, kwargs, attempts, max_attempts, created_at,
                           run_at, finished_at, expires_at, run_seconds FROM job_results""")
    estimated = admin.status(conn)["succeeded"]
    assert estimated["estimated"] is True
    assert 30000 <= estimated["total"] <= 50000, estimated
    assert 0.6 <= estimated["queues"]["default"] / estimated["total"] <= 0.9, estimated


def test_history_in_the_cli_status_and_metrics(db_url, cli):
    wide = {"COLUMNS": "200"}
    ids = [total.enqueue(i, 1) for i in range(3)]
    other = async_total.using(queue="reports").enqueue(5, 5)
    plain_total.enqueue(1, 1)
    burst(cli, 1, "--queues", "default,reports")

    listed = cli("jobs", "list", "--state", "succeeded", env=wide)
    assert listed.returncode == 0, listed.stderr
    for job_id in [*ids, other]:
        assert f"\n│ {job_id} " in listed.stdout or f"│ {job_id} " in listed.stdout
    assert '"sum": 1}' in listed.stdout and '"sum": 3}' in listed.stdout and "[10, 4]" in listed.stdout
    by_queue = cli("jobs", "list", "--state", "succeeded", "--queue", "reports", env=wide)
    assert "test.async_total" in by_queue.stdout and "test.total" not in by_queue.stdout.replace("async_total", "")
    by_task = cli("jobs", "list", "--state", "succeeded", "--task", "%async%", env=wide)
    assert str(other) in by_task.stdout and "test.total " not in by_task.stdout

    shown = cli("jobs", "show", str(ids[2]))
    assert shown.returncode == 0, shown.stderr
    assert "state: succeeded" in shown.stdout and "result: {" in shown.stdout and '"sum": 3}' in shown.stdout
    assert "run_seconds:" in shown.stdout and "finished_at:" in shown.stdout
    retried = cli("jobs", "retry", str(ids[2]))
    assert retried.returncode == 2 and retried.stderr.startswith("error: job") and "succeeded" in retried.stderr

    doc = json.loads(cli("status", "--json").stdout)
    assert doc["succeeded"] == {"total": 4, "queues": {"default": 3, "reports": 1}, "estimated": False}
    assert set(doc["totals"]) == {"ready", "scheduled", "running", "dead", "retrying", "waiting"}  # unchanged
    human = cli("status", env=wide).stdout
    assert "succeeded (kept): 4 (default 3, reports 1)" in human

    bad = cli("jobs", "list", "--state", "finished")
    assert bad.returncode == 2 and "succeeded" in bad.stderr

    from starlette.testclient import TestClient

    from dj.web import create_app

    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        metrics = client.get("/metrics").text
    assert 'dj_jobs{queue="default",state="succeeded"} 3.0' in metrics
    assert 'dj_jobs{queue="reports",state="succeeded"} 1.0' in metrics


def test_the_test_mode_keeps_results_too(dj_jobs):
    job_id = total.enqueue(2, 3)
    plain = plain_total.enqueue(1, 1)
    with pytest.raises(TimeoutError, match="drain"):
        dj.result(job_id)
    dj_jobs.drain()
    assert dj.result(job_id)["sum"] == 5
    assert asyncio.run(dj.result_async(job_id))["sum"] == 5
    with pytest.raises(dj.ResultNotKept):
        dj.result(plain)
    with pytest.raises(LookupError):
        dj.result(999)
    a = async_total.enqueue(1, 1)
    failing = kept_failure.enqueue("x")
    with pytest.raises(ValueError):
        dj_jobs.drain()
    dj_jobs.drain()
    assert dj.result(a) == [2, a]
    with pytest.raises(dj.JobDead, match="kept job x failed"):
        dj.result(failing)


def test_inline_mode_returns_the_value_at_once(dj_inline):
    assert dj.result(total.enqueue(4, 4))["sum"] == 8
    assert dj.result(async_total.enqueue(1, 2))[0] == 3


def test_history_page_on_the_dashboard_searchable_by_task_and_queue(db_url, cli):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from dj.web import create_app

    ids = [total.enqueue(i, 0) for i in range(3)]
    report = async_total.using(queue="reports").enqueue(1, 1)
    broken = returns_nothing_json.enqueue()
    burst(cli, 1, "--queues", "default,reports")

    html = {"Accept": "text/html"}
    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        page = client.get("/history", headers=html)
        assert page.status_code == 200
        shown = [int(x) for x in __import__("re").findall(r'<tr data-job="(\d+)">', page.text)]
        assert shown == sorted([*ids, report, broken], reverse=True)  # newest first
        assert "not kept" in page.text and "&#34;sum&#34;: 2}" in page.text
        by_queue = client.get("/history?queue=reports", headers=html).text
        assert f'data-job="{report}"' in by_queue and f'data-job="{ids[0]}"' not in by_queue
        by_task = client.get("/history?task=async", headers=html).text  # part of a task name
        assert f'data-job="{report}"' in by_task and f'data-job="{ids[1]}"' not in by_task
        nothing = client.get("/history?task=nope", headers=html).text
        assert "No kept successes match this search" in nothing
        job = client.get(f"/jobs/{ids[2]}", headers=html)
        assert job.status_code == 200 and 'data-field="result"' in job.text and "succeeded" in job.text
        assert 'data-action="cancel"' not in job.text and 'data-action="retry"' not in job.text
        overview = client.get("/", headers=html).text
        assert 'data-total="succeeded"' in overview and 'href="/history"' in overview
