"""Graceful shutdown, second signals, kill -9 and supervisor restarts, with real processes."""

import os
import signal

import dj
from tests.conftest import wait_for
from tests.support_jobs import hang_first_attempt, record, sleep


def markers(conn):
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs ORDER BY at")]


def test_sigterm_finishes_running_jobs_and_hands_back_unstarted_ones(conn, worker_process):
    sleep.using(priority=0).enqueue_many([(2, "a"), (2, "b")])
    waiting = record.using(priority=9).enqueue_many([(f"w{i}",) for i in range(5)])
    worker = worker_process("--concurrency", "2")
    wait_for(lambda: {"a:start", "b:start"} <= set(markers(conn)), message="both sleeps to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert {"a:end", "b:end"} <= set(markers(conn))
    assert not any(m.startswith("w") for m in markers(conn))
    rows = conn.execute("SELECT id, attempts, locked_by FROM jobs ORDER BY id").fetchall()
    assert rows == [(i, 0, None) for i in waiting], "unstarted jobs must come back untouched"
    assert conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 0


def test_jobs_still_running_after_the_shutdown_timeout_are_handed_back(conn, worker_process):
    job_id = sleep.enqueue(60, "long")
    worker = worker_process("--shutdown-timeout", "1")
    wait_for(lambda: "long:start" in markers(conn), message="the long job to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert conn.execute("SELECT attempts, locked_by FROM jobs WHERE id = %s", (job_id,)).fetchone() == (1, None)


def test_a_second_signal_stops_at_once_and_frees_the_jobs(conn, worker_process):
    job_id = sleep.enqueue(60, "long")
    worker = worker_process("--shutdown-timeout", "60")
    wait_for(lambda: "long:start" in markers(conn), message="the long job to start")
    worker.send_signal(signal.SIGINT)
    worker.wait_for_log("finishing running jobs")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(10) == 0
    assert conn.execute("SELECT locked_by FROM jobs WHERE id = %s", (job_id,)).fetchone() == (None,)


def test_jobs_of_a_worker_killed_with_sigkill_run_again_after_the_lock_timeout(conn, worker_process):
    job_id = hang_first_attempt.enqueue("crash")
    victim = worker_process("--lock-timeout", "2")
    wait_for(lambda: markers(conn) == ["crash"], message="the first attempt to start")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert conn.execute("SELECT locked_by IS NOT NULL FROM jobs WHERE id = %s", (job_id,)).fetchone() == (True,)

    worker_process("--lock-timeout", "2")
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs WHERE id = %s", (job_id,)).fetchone()[0] == 0,
             timeout=30, message="the orphaned job to be re-run and finish")
    attempts = [r[0] for r in conn.execute("SELECT attempt FROM test_runs ORDER BY at")]
    assert attempts == [1, 2], "the lost attempt counts, and the job ran exactly once more"


def test_the_supervisor_replaces_a_child_killed_with_sigkill(conn, worker_process):
    supervisor = worker_process("--processes", "2", "--concurrency", "1")
    pids = wait_for(lambda: {r[0] for r in conn.execute("SELECT pid FROM workers")} if
                    conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 2 else None,
                    message="two worker processes to register")
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len({r[0] for r in conn.execute("SELECT pid FROM workers WHERE pid <> %s", (victim,))}) == 2,
             message="a replacement worker to register")
    record.enqueue_many([(f"after{i}",) for i in range(20)])
    wait_for(lambda: len(markers(conn)) == 20, message="the replacement pool to run new jobs")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
    supervisor.wait_for_log(f"worker process {victim} exited with signal SIGKILL; starting a replacement")


def test_a_supervised_worker_that_cannot_reach_the_database_logs_one_line(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    spec = {"options": {"queues": ["default"], "concurrency": 1,
                        "database_url": "postgresql://bob:s3cret@127.0.0.1:1/nowhere"},
            "burst": True, "log_level": 20, "log_format": "text"}
    child = subprocess.run([sys.executable, "-c", "from dj.supervisor import child_main; child_main()"],
                           env={**os.environ, "DJ_WORKER_OPTIONS": json.dumps(spec)}, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 1
    assert "Traceback" not in child.stderr
    assert "worker process could not start: cannot connect to postgresql://bob:***@127.0.0.1:1" in child.stderr
    assert "s3cret" not in child.stderr


def test_a_supervised_worker_whose_connection_fails_during_start_up_logs_one_line(db_url, conn):
    """As when the server goes down just after a replacement connected: a database error in the
    middle of start-up (here its registration times out on a lock) is one line, not a traceback."""
    import json
    import subprocess
    import sys

    from psycopg import conninfo

    from tests.conftest import ROOT

    url = conninfo.make_conninfo(db_url, options="-c lock_timeout=50")
    spec = {"options": {"queues": ["default"], "concurrency": 1, "database_url": url},
            "burst": True, "log_level": 20, "log_format": "text"}
    with conn.transaction():
        conn.execute("LOCK TABLE workers IN ACCESS EXCLUSIVE MODE")
        child = subprocess.run([sys.executable, "-c", "from dj.supervisor import child_main; child_main()"],
                               env={**os.environ, "DJ_WORKER_OPTIONS": json.dumps(spec)}, cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
    assert child.returncode == 1
    assert "Traceback" not in child.stderr, child.stderr
    assert "worker process could not start: canceling statement due to lock timeout" in child.stderr, child.stderr
    assert len(child.stderr.strip().splitlines()) == 1, child.stderr


def test_a_claim_whose_answer_was_lost_with_the_connection_is_handed_back(db_url, conn):
    """The connection dropped after the database committed a claim but before the worker read it:
    on reconnecting, the worker releases the rows locked in its name that it does not hold, with
    the attempt undone, and keeps the ones it holds."""
    held, lost_a, lost_b, other = record.enqueue_many([(i,) for i in range(4)])
    conn.execute("UPDATE jobs SET locked_by = 'w-lost', locked_at = now(), attempts = 1 WHERE id <> %s", (other,))
    conn.execute("UPDATE jobs SET locked_by = 'w-other', locked_at = now(), attempts = 1 WHERE id = %s", (other,))
    worker = dj.Worker(queues=["default"], name="w-lost", database_url=db_url)
    worker._held[held] = None  # what it holds is all that matters here: the ids
    try:
        assert worker._reconnect() is not None
    finally:
        worker._conn.close()
    rows = dict((i, (by, a)) for i, by, a in conn.execute("SELECT id, locked_by, attempts FROM jobs"))
    assert rows == {held: ("w-lost", 1), lost_a: (None, 0), lost_b: (None, 0), other: ("w-other", 1)}
