"""Job timeouts: @job(timeout=) and --default-timeout fail the attempt and retry it, the late result
is ignored, and a worker whose threads are all stuck is replaced by its supervisor."""

import re
import signal

from tests.conftest import dj_cli, wait_for
from tests.support_jobs import record, sleep
from tests.support_reliability import RELIABILITY_ENV, gate_passed, gated_timeout, open_gate, stuck_first_attempt


def job_row(conn, job_id):
    return conn.execute("SELECT attempts, locked_by, last_error, failed_at IS NOT NULL,"
                        " extract(epoch FROM run_at - now())::float8 FROM jobs WHERE id = %s", (job_id,)).fetchone()


def stats(conn):
    return conn.execute("SELECT coalesce(sum(succeeded), 0), coalesce(sum(failed), 0) FROM job_stats").fetchone()


def test_a_job_past_its_timeout_is_failed_and_retried_and_its_late_result_is_ignored(conn, worker_process, tmp_path):
    gate = str(tmp_path)
    job_id = gated_timeout.enqueue("t", gate)  # @job(timeout=1)
    open_gate(gate, "t", 2)  # the retry succeeds at once
    worker = worker_process("--concurrency", "2", env=RELIABILITY_ENV)
    wait_for(lambda: (job_row(conn, job_id) or [None] * 3)[2] == "timed out after 1 s", timeout=20,
             message="the attempt to time out")
    attempts, locked_by, _, dead, wait = job_row(conn, job_id)
    assert (attempts, locked_by, dead) == (1, None, False)
    assert 5 <= wait <= 6 * 1.1, "retried with the usual backoff"

    open_gate(gate, "t", 1)  # attempt 1 now returns, successfully, long after its timeout
    wait_for(lambda: gate_passed(gate, "t", 1), message="the late attempt to finish")
    worker.send_signal(signal.SIGTERM)  # records every outcome it kept before exiting
    assert worker.wait(30) == 0
    assert "0 succeeded, 1 failed, 0 dead" in worker.log(), "the late success was dropped"
    assert job_row(conn, job_id)[:4] == (1, None, "timed out after 1 s", False)
    assert stats(conn) == (0, 1)

    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job_id,))
    assert dj_cli("work", "--burst", env=RELIABILITY_ENV).returncode == 0
    assert job_row(conn, job_id) is None
    assert [r[0] for r in conn.execute("SELECT attempt FROM test_runs ORDER BY at")] == [1, 2]
    assert stats(conn) == (1, 1)


def test_default_timeout_applies_to_tasks_without_their_own(conn, worker_process, tmp_path):
    plain = sleep.enqueue(60, "plain")  # no timeout of its own
    own = gated_timeout.enqueue("own", str(tmp_path))  # @job(timeout=1) wins over the default
    worker_process("--concurrency", "2", "--default-timeout", "2", env=RELIABILITY_ENV)
    errors = lambda: dict(conn.execute("SELECT id, last_error FROM jobs WHERE last_error IS NOT NULL"))  # noqa: E731
    wait_for(lambda: len(errors()) == 2, timeout=20, message="both jobs to time out")
    assert errors() == {plain: "timed out after 2 s", own: "timed out after 1 s"}


def test_the_supervisor_replaces_a_worker_whose_threads_are_all_stuck(conn, worker_process):
    stuck = stuck_first_attempt.enqueue("s")  # timeout 1 s; attempt 1 sleeps for 120 s
    supervisor = worker_process("--processes", "2", "--concurrency", "1", "--prefetch", "0", env=RELIABILITY_ENV)
    exited = re.compile(r"worker process (\d+) exited with code 3 \(all its threads were stuck\); "
                        r"starting a replacement")
    victim = int(wait_for(lambda: exited.search(supervisor.log()), timeout=30,
                          message="the stuck worker to exit").group(1))
    assert "all 1 runner threads are stuck in jobs far past their timeout" in supervisor.log()
    wait_for(lambda: len({r[0] for r in conn.execute("SELECT pid FROM workers WHERE pid <> %s", (victim,))}) == 2,
             message="a replacement worker to register")

    attempts, locked_by, error, dead, _ = job_row(conn, stuck)
    assert (attempts, locked_by, error, dead) == (1, None, "timed out after 1 s", False)
    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (stuck,))
    conn.execute("SELECT pg_notify('dj_jobs', 'default')")
    record.enqueue_many([(f"after{i}",) for i in range(5)])
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0,
             message="the pool to run the retry and new jobs")
    assert conn.execute("SELECT count(*) FROM test_runs").fetchone()[0] == 6
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
