"""Coroutine jobs the tests enqueue (workers import this module through DJ_TASKS). They record into
test_runs from a thread (asyncio.to_thread), so that recording does not hold up the event loop."""

import asyncio
import os
import time

import dj
from dj import job


def _insert(job_id: int, marker: str, attempt: int) -> None:
    with dj.transaction() as conn:
        conn.execute("INSERT INTO test_runs (job_id, marker, attempt, pid) VALUES (%s, %s, %s, %s)",
                     (job_id, marker, attempt, os.getpid()))


async def _record(marker) -> None:
    ctx = dj.current_job()  # read here, in the job's own asyncio task
    await asyncio.to_thread(_insert, ctx.id if ctx else 0, str(marker), ctx.attempt if ctx else 0)


@job(name="test.async_record")
async def async_record(marker) -> None:
    await _record(marker)


@job(name="test.async_sleep")
async def async_sleep(seconds: float, marker="async_sleep") -> None:
    await _record(f"{marker}:start")
    await asyncio.sleep(seconds)
    await _record(f"{marker}:end")


@job(name="test.async_fail_once")
async def async_fail_once(marker) -> None:
    await _record(marker)
    if dj.current_job().attempt == 1:
        raise RuntimeError("first async attempt fails")


@job(name="test.async_hang", timeout=0.5, max_attempts=2)
async def async_hang(marker) -> None:
    """Waits far past its timeout, and records the CancelledError that the timeout raises in it."""
    await _record(f"{marker}:start")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await _record(f"{marker}:cancelled")
        raise
    await _record(f"{marker}:not cancelled")


@job(name="test.async_block")
async def async_block(seconds: float, marker="block") -> None:
    """Blocks the event loop (time.sleep, not asyncio.sleep): what the worker warns about."""
    time.sleep(seconds)
    await _record(marker)


@job(name="test.async_progress")
async def async_progress(marker, seconds: float) -> None:
    await dj.current_job().progress_async(0.25, "a quarter")
    await _record(f"{marker}:reported")
    await asyncio.sleep(seconds)


@job(name="test.async_noop")
async def async_noop() -> None:
    pass
