"""Coroutine tasks: `@job` on an `async def`, run by real `dj work` processes on their event loop."""

import signal

import dj
from tests.conftest import wait_for
from tests.support_async import (async_block, async_fail_once, async_hang, async_progress, async_record,
                                 async_sleep)
from tests.support_jobs import record, sleep


def markers(conn):
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs ORDER BY at, marker")]


def test_an_async_task_is_flagged_and_calling_it_returns_the_coroutine():
    import asyncio

    assert async_record.is_async and not record.is_async
    coro = async_sleep(0, "direct")
    assert asyncio.iscoroutine(coro)
    coro.close()


def test_async_jobs_run_and_succeed_with_their_own_current_job(conn, run_burst):
    ids = async_record.enqueue_many([(f"a{i}",) for i in range(20)])
    run_burst()
    rows = conn.execute("SELECT job_id, marker, attempt FROM test_runs ORDER BY job_id").fetchall()
    # current_job() inside each coroutine is that job: its id, its attempt.
    assert rows == [(job_id, f"a{i}", 1) for i, job_id in enumerate(ids)]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert dj.status(conn)["throughput"]["succeeded_last_minute"] == 20


def test_a_failing_async_job_is_retried(conn, run_burst):
    job_id = async_fail_once.enqueue("flaky")
    run_burst()
    attempts, error = conn.execute("SELECT attempts, last_error FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert attempts == 1 and "RuntimeError: first async attempt fails" in error
    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job_id,))
    run_burst()
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert [r[0] for r in conn.execute("SELECT attempt FROM test_runs ORDER BY at")] == [1, 2]


def test_many_async_jobs_are_in_flight_at_once_on_one_process(conn, run_burst):
    n, seconds = 50, 0.5
    async_sleep.enqueue_many([(seconds, f"s{i}") for i in range(n)])
    run_burst(("default",), 1, 1)  # one process, one thread: only the event loop can overlap them
    rows = conn.execute("SELECT marker, extract(epoch FROM at)::float8, pid FROM test_runs").fetchall()
    assert len({pid for _, _, pid in rows}) == 1
    starts = {m.split(":")[0]: t for m, t, _ in rows if m.endswith(":start")}
    ends = {m.split(":")[0]: t for m, t, _ in rows if m.endswith(":end")}
    assert len(starts) == len(ends) == n
    # In sequence they would take n * seconds = 25 s. Every job started before the first one ended,
    # so all 50 were in flight together.
    assert max(starts.values()) < min(ends.values())
    assert max(ends.values()) - min(starts.values()) < n * seconds / 5


def test_async_concurrency_bounds_the_jobs_in_flight(conn, run_burst):
    n, seconds = 12, 0.4
    async_sleep.enqueue_many([(seconds, f"s{i}") for i in range(n)])
    run_burst(("default",), 1, 1, "--async-concurrency", "3")
    events = sorted((t, 1 if m.endswith(":start") else -1) for m, t in conn.execute(
        "SELECT marker, extract(epoch FROM at)::float8 FROM test_runs"))
    in_flight, most = 0, 0
    for _, step in events:
        in_flight += step
        most = max(most, in_flight)
    assert most == 3


def test_a_timeout_cancels_an_async_job_inside_it_and_the_attempt_fails(conn, run_burst):
    job_id = async_hang.enqueue("h")  # timeout=0.5, max_attempts=2
    run_burst()
    assert markers(conn) == ["h:start", "h:cancelled"], "CancelledError was raised inside the job"
    attempts, dead, error = conn.execute(
        "SELECT attempts, failed_at IS NOT NULL, last_error FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert (attempts, dead, error) == (1, False, "timed out after 0.5 s")
    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job_id,))
    run_burst()
    attempts, dead, error = conn.execute(
        "SELECT attempts, failed_at IS NOT NULL, last_error FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert (attempts, dead, error) == (2, True, "timed out after 0.5 s")


def test_progress_from_an_async_job(conn, worker_process):
    job_id = async_progress.enqueue("p", 30)
    worker = worker_process("--concurrency", "1")
    wait_for(lambda: "p:reported" in markers(conn), message="the job's progress report")
    assert conn.execute("SELECT progress->>'fraction', progress->>'message' FROM jobs WHERE id = %s",
                        (job_id,)).fetchone() == ("0.25", "a quarter")
    worker.send_signal(signal.SIGINT)
    worker.send_signal(signal.SIGINT)  # the second signal: stop now, hand back the job
    assert worker.wait(30) == 0


def test_a_job_that_blocks_the_loop_is_warned_about_once_naming_its_task(conn, worker_process):
    async_block.enqueue_many([(0.8, f"b{i}") for i in range(3)])
    worker = worker_process("--concurrency", "1")
    wait_for(lambda: len(markers(conn)) == 3, message="three blocking jobs")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    warnings = [line for line in worker.log_lines if "blocked the event loop" in line]
    assert len(warnings) == 1, worker.log()
    assert "test.async_block" in warnings[0]


def test_one_dj_work_runs_sync_and_async_jobs_together(conn, run_burst):
    sync_ids = sleep.enqueue_many([(0.3, f"t{i}") for i in range(4)])
    async_ids = async_sleep.enqueue_many([(0.3, f"c{i}") for i in range(20)])
    run_burst(("default",), 1, 4)
    rows = conn.execute("SELECT job_id, marker, pid FROM test_runs").fetchall()
    assert len({pid for _, _, pid in rows}) == 1
    assert {j for j, m, _ in rows if m.endswith(":end")} == set(sync_ids) | set(async_ids)
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_sigterm_finishes_running_async_jobs_and_hands_back_unstarted_ones(conn, worker_process):
    ids = async_sleep.enqueue_many([(1.5, f"w{i}") for i in range(6)])
    worker = worker_process("--concurrency", "1", "--async-concurrency", "2")
    wait_for(lambda: sum(m.endswith(":start") for m in markers(conn)) == 2, message="two async jobs started")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    ended = {m.split(":")[0] for m in markers(conn) if m.endswith(":end")}
    started = {m.split(":")[0] for m in markers(conn) if m.endswith(":start")}
    assert ended == started and len(ended) == 2, "the running jobs finished"
    rows = conn.execute("SELECT id, attempts, locked_by FROM jobs ORDER BY id").fetchall()
    assert len(rows) == 4 and all(a == 0 and by is None for _, a, by in rows), "the rest went back unstarted"
    assert {r[0] for r in rows} < set(ids)


def test_sigterm_hands_back_async_jobs_still_running_after_the_shutdown_timeout(conn, worker_process):
    job_id = async_sleep.enqueue(60, "long")
    worker = worker_process("--shutdown-timeout", "1")
    wait_for(lambda: "long:start" in markers(conn), message="the job started")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert "still running after 1s; handing them back" in worker.log()
    assert conn.execute("SELECT attempts, locked_by FROM jobs WHERE id = %s", (job_id,)).fetchone() == (1, None)
    assert "Traceback" not in worker.log()
