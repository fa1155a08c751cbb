"""Jobs whose successes are kept (keep=), for tests/test_results.py. Workers import this module
through DJ_TASKS (the tests pass it with RESULT_TASKS)."""

import asyncio
import os
import time
from datetime import timedelta

import dj
from dj import job

RESULT_TASKS = {"DJ_TASKS": "tests.support_jobs,tests.support_async,tests.support_results"}


@job(name="test.total", keep=3600)
def total(a, b):
    """a + b, and which process computed it."""
    return {"sum": a + b, "pid": os.getpid()}


@job(name="test.async_total", keep=timedelta(hours=1))
async def async_total(a, b):
    await asyncio.sleep(0.01)
    return [a + b, dj.current_job().id]


@job(name="test.slow_total", keep=3600)
def slow_total(a, b, seconds: float = 0.5):
    time.sleep(seconds)
    return a + b


@job(name="test.returns_nothing_json", keep=3600)
def returns_nothing_json():
    return {1, 2, 3}  # a set: not JSON


@job(name="test.returns_too_much", keep=3600)
def returns_too_much():
    return "x" * 1_100_000


@job(name="test.kept_failure", keep=3600, max_attempts=1)
def kept_failure(marker):
    raise ValueError(f"kept job {marker} failed")


@job(name="test.plain_total")
def plain_total(a, b):
    return a + b
