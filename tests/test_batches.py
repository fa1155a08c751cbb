"""Batches: the callback runs exactly once, when the last job succeeds or dies, and sees the counts."""

import time
from datetime import datetime, timezone

import dj
from tests.support_jobs import batch_done, fail, record, until, with_progress


def callbacks(conn):
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs WHERE marker LIKE 'callback:%' ORDER BY at")]


def test_the_callback_sees_successes_and_deaths(conn, run_burst):
    with dj.batch(on_complete=batch_done, args=["mixed"]) as b:
        record.enqueue_many([("a",), ("b",)])
        fail.using(max_attempts=1).enqueue("c")
    assert b.total == 3
    run_burst()
    run_burst()  # the callback was enqueued by the last completion
    assert callbacks(conn) == ["callback:mixed:2/1/3"]
    row = conn.execute("SELECT total, succeeded, dead, finished_at IS NOT NULL FROM batches WHERE id = %s",
                       (b.id,)).fetchone()
    assert row == (3, 2, 1, True)


def test_a_batch_whose_jobs_finished_before_it_closed_calls_back_at_close(conn, run_burst):
    with dj.batch(on_complete=batch_done, args=["early"]):
        record.enqueue("only")
        run_burst()
        assert callbacks(conn) == []
    run_burst()
    assert callbacks(conn) == ["callback:early:1/0/1"]


def test_cancelling_a_waiting_job_counts_it_as_dead_so_the_batch_still_completes(conn, cli, run_burst):
    later = time.time() + 3600
    with dj.batch(on_complete=batch_done, args=["cancel"]) as b:
        record.enqueue("now")
        scheduled = record.using(run_at=datetime.fromtimestamp(later, timezone.utc)).enqueue("later")
        dead = fail.using(max_attempts=1).enqueue("dies")
    run_burst()
    assert callbacks(conn) == []
    assert cli("jobs", "cancel", str(dead)).returncode == 0  # counted when it died: not again
    assert conn.execute("SELECT dead FROM batches WHERE id = %s", (b.id,)).fetchone()[0] == 1
    assert cli("jobs", "cancel", str(scheduled)).returncode == 0
    run_burst()
    assert callbacks(conn) == ["callback:cancel:1/2/3"]


def test_one_callback_when_the_last_two_jobs_finish_at_the_same_moment(conn, run_burst):
    for round_ in range(3):
        at = time.time() + 2.5
        with dj.batch(on_complete=batch_done, args=[f"race{round_}"]):
            until.enqueue_many([(at, f"r{round_}a"), (at, f"r{round_}b")])
    run_burst(("default",), 2, 1)
    run_burst()
    assert sorted(callbacks(conn)) == [f"callback:race{i}:2/0/2" for i in range(3)]


def test_a_running_job_reports_progress(conn, worker_process, cli):
    from tests.conftest import wait_for

    job_id = with_progress.enqueue("p", 30)
    worker = worker_process("--shutdown-timeout", "1")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs WHERE marker = 'p:reported'").fetchone()[0],
             message="the job to report progress")
    assert conn.execute("SELECT progress->>'fraction', progress->>'message' FROM jobs WHERE id = %s",
                        (job_id,)).fetchone() == ("0.5", "half way")
    status = cli("status")
    assert "half way" in status.stdout and "50%" in status.stdout
    worker.terminate()
    worker.wait(30)
