"""Failures: DelayedJob's backoff, the dead state, Permanent, unknown tasks and malformed rows."""


import pytest

from dj.worker import retry_delay
from tests.support_jobs import fail, fail_once, permanent, record


def job_row(conn, job_id):
    return conn.execute(
        "SELECT attempts, failed_at IS NOT NULL, locked_by, last_error,"
        " extract(epoch FROM run_at - now())::float8 FROM jobs WHERE id = %s", (job_id,)).fetchone()


def make_ready(conn, job_id):
    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job_id,))


@pytest.mark.no_database
@pytest.mark.parametrize("attempts", [1, 2, 3, 5, 10, 24])
def test_backoff_is_attempts_to_the_fourth_plus_five_with_bounded_jitter(attempts):
    base = attempts**4 + 5
    delays = [retry_delay(attempts) for _ in range(200)]
    assert all(base <= d <= base * 1.1 for d in delays)
    assert len(set(delays)) > 1, "no jitter"


def test_a_failing_job_is_retried_with_backoff_then_dead(conn, run_burst):
    job_id = fail.enqueue("x")  # max_attempts=3
    run_burst()
    attempts, dead, locked_by, error, wait = job_row(conn, job_id)
    assert (attempts, dead, locked_by) == (1, False, None)
    assert "ValueError: boom x" in error
    assert 6 - 1 <= wait <= 6 * 1.1  # 1**4 + 5 seconds, plus jitter, minus the time since

    make_ready(conn, job_id)
    run_burst()
    attempts, dead, _, _, wait = job_row(conn, job_id)
    assert (attempts, dead) == (2, False)
    assert 21 - 1 <= wait <= 21 * 1.1

    make_ready(conn, job_id)
    run_burst()
    attempts, dead, locked_by, error, _ = job_row(conn, job_id)
    assert (attempts, dead, locked_by) == (3, True, None)
    assert "boom x" in error
    assert conn.execute("SELECT count(*) FROM test_runs WHERE marker = 'x'").fetchone()[0] == 3

    # Dead jobs stay put: another burst does not touch them.
    run_burst()
    assert job_row(conn, job_id)[:2] == (3, True)


def test_a_job_that_fails_once_succeeds_on_retry(conn, run_burst):
    job_id = fail_once.enqueue("flaky")
    run_burst()
    assert job_row(conn, job_id)[0] == 1
    make_ready(conn, job_id)
    run_burst()
    assert job_row(conn, job_id) is None
    assert [r[0] for r in conn.execute("SELECT attempt FROM test_runs ORDER BY at")] == [1, 2]


def test_permanent_goes_dead_at_once(conn, run_burst):
    job_id = permanent.enqueue("p")
    run_burst()
    attempts, dead, _, error, _ = job_row(conn, job_id)
    assert (attempts, dead) == (1, True)
    assert "this can never work" in error


def test_unknown_task_goes_dead_at_once_and_the_worker_carries_on(conn, run_burst):
    conn.execute("INSERT INTO jobs (task, args) VALUES ('no.such.task', '[1]')")
    record.enqueue("after")
    run_burst()
    attempts, dead, error = conn.execute(
        "SELECT attempts, failed_at IS NOT NULL, last_error FROM jobs WHERE task = 'no.such.task'").fetchone()
    assert (attempts, dead) == (1, True)
    assert "unknown task 'no.such.task'" in error
    assert [r[0] for r in conn.execute("SELECT marker FROM test_runs")] == ["after"]


@pytest.mark.parametrize("args, kwargs", [("\"a string\"", "{}"), ("42", "{}"), ("null", "{}"),
                                          ("[]", "[1, 2]"), ("{\"a\": 1}", "{}")])
def test_rows_with_malformed_arguments_go_dead_with_a_clear_error(conn, run_burst, args, kwargs):
    conn.execute("INSERT INTO jobs (task, args, kwargs) VALUES ('test.record', %s::jsonb, %s::jsonb)",
                 (args, kwargs))
    record.enqueue("fine")
    run_burst()
    dead, error = conn.execute("SELECT failed_at IS NOT NULL, last_error FROM jobs").fetchone()
    assert dead
    assert "args must be a JSON array and kwargs a JSON object" in error
    assert [r[0] for r in conn.execute("SELECT marker FROM test_runs")] == ["fine"]


def test_a_successful_retry_counts_one_failure_and_one_success(conn, run_burst):
    import dj

    job_id = fail_once.enqueue("y")
    run_burst()
    make_ready(conn, job_id)
    run_burst()
    assert dj.status(conn)["throughput"] == {"succeeded_last_minute": 1, "failed_last_minute": 1}
