"""Jobs for the rate limit tests. Each records its claim time: the locked_at of its row, which is the
"start" a rate limit counts (dj/rates.py), into test_runs.at."""

import os
import time

import dj
from dj import job


def record_claim(marker: str, seconds: float = 0.0) -> None:
    ctx = dj.current_job()
    with dj.transaction() as conn:
        conn.execute("INSERT INTO test_runs (job_id, marker, attempt, pid, at)"
                     " SELECT id, %s, attempts, %s, locked_at FROM jobs WHERE id = %s",
                     (marker, os.getpid(), ctx.id))
    time.sleep(seconds)


@job(name="test.rate.claim")
def claim(marker: str, seconds: float = 0.0) -> None:
    record_claim(marker, seconds)


@job(name="test.rate.task", rate="5/s")
def rated(marker: str, seconds: float = 0.0) -> None:
    record_claim(marker, seconds)
