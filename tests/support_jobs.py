"""Jobs the tests enqueue. Workers import this module through DJ_TASKS=tests.support_jobs."""

import time

import dj
from dj import Permanent, job

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS test_runs (
    job_id bigint NOT NULL,
    marker text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def _record(marker) -> None:
    ctx = dj.current_job()
    import os

    with dj.transaction() as conn:
        conn.execute("INSERT INTO test_runs (job_id, marker, attempt, pid) VALUES (%s, %s, %s, %s)",
                     (ctx.id if ctx else 0, str(marker), ctx.attempt if ctx else 0, os.getpid()))


@job(name="test.record")
def record(marker) -> None:
    _record(marker)


@job(name="test.record_slowly")
def record_slowly(marker, seconds: float) -> None:
    time.sleep(seconds)
    _record(marker)


@job(name="test.fail", max_attempts=3)
def fail(marker) -> None:
    _record(marker)
    raise ValueError(f"boom {marker}")


@job(name="test.fail_once")
def fail_once(marker) -> None:
    _record(marker)
    if dj.current_job().attempt == 1:
        raise RuntimeError("first attempt fails")


@job(name="test.permanent")
def permanent(marker) -> None:
    _record(marker)
    raise Permanent("this can never work")


@job(name="test.sleep")
def sleep(seconds: float, marker="sleep") -> None:
    _record(f"{marker}:start")
    time.sleep(seconds)
    _record(f"{marker}:end")


@job(name="test.hang_first_attempt")
def hang_first_attempt(marker, seconds: float = 120) -> None:
    _record(marker)
    if dj.current_job().attempt == 1:
        time.sleep(seconds)
