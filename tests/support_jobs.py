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


@job(name="test.unique_record", unique=True)
def unique_record(marker) -> None:
    _record(marker)


@job(name="test.until", queue="default")
def until(epoch: float, marker) -> None:
    """Finish at a given moment, so that several jobs end at the same time."""
    time.sleep(max(0.0, epoch - time.time()))
    _record(marker)


@job(name="test.batch_done")
def batch_done(label, batch) -> None:
    _record(f"callback:{label}:{batch['succeeded']}/{batch['dead']}/{batch['total']}")


@job(name="test.with_progress")
def with_progress(marker, seconds: float) -> None:
    dj.current_job().progress(0.5, "half way")
    _record(f"{marker}:reported")
    time.sleep(seconds)


def _record_cron_tick() -> None:
    """Record the tick this cron job was enqueued for (its run_at), so tests can count jobs per tick."""
    ctx = dj.current_job()
    with dj.transaction() as conn:
        run_at = conn.execute("SELECT run_at FROM jobs WHERE id = %s", (ctx.id,)).fetchone()[0]
    _record(f"cron:{run_at.isoformat()}")


# Only workers started with DJ_TEST_CRON=1 know this cron job: other tests' workers would otherwise
# enqueue its ticks in the middle of their counts. croniter's sixth field is seconds.
import os as _os  # noqa: E402

if _os.environ.get("DJ_TEST_CRON"):
    cron_every_2s = job(name="test.cron_every_2s", queue="cron-test", cron="* * * * * */2")(_record_cron_tick)
