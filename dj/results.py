"""Results of kept jobs: `dj.result(job_id)` and `await dj.result_async(job_id)`.

A job enqueued with `keep=` (seconds or a timedelta, on `@job` or `using()`) is moved on success
from `jobs` to `job_results` (sql.COMPLETE_KEEP) with its return value as JSON, its run time and
its finish time, and stays there until it expires and a worker prunes it (dj/pruning.py).

result() waits for the job to end and returns its value (decoded from JSON):
- a dead job raises `JobDead` with its last error;
- an unknown id, or one already pruned, raises `LookupError`;
- a job enqueued without keep raises `ResultNotKept` (a LookupError) at once, while it is still
  queued: its success will delete it, value and all. Once such a job has succeeded its row is
  gone, and it is as unknown as a pruned one;
- a success whose value could not be kept (not JSON, too big) raises `ResultError`;
- `timeout` seconds without an end raises `TimeoutError`.

Waiting: a LISTEN on sql.RESULTS_CHANNEL, on which COMPLETE_KEEP and FAIL notify the ids of jobs
that were kept or died (comma-separated, up to 300 a notification), with a look at the job every POLL_WITH_LISTEN seconds as the fallback (a
job the reaper made dead sends no NOTIFY). Where LISTEN cannot work (behind a transaction pooler
without DJ_LISTEN_URL, see dj/pooler.py) it polls instead, from POLL_MIN up to POLL_MAX seconds
apart. Each look is one primary-key probe of each table (sql.RESULT_OF).

Under the test mode (dj.testing), result() reads the jobs the capture ran instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg

from . import config, db, pooler, sql
from .enqueueing import MAX_ARGS_BYTES, to_json
from .errors import JobDead, ResultError, ResultNotKept

__all__ = ["JobDead", "MAX_RESULT_BYTES", "ResultError", "ResultNotKept", "encode_result", "result", "result_async"]

# A return value is held to the arguments' limit: it sits in a table every history read scans.
MAX_RESULT_BYTES = MAX_ARGS_BYTES
POLL_WITH_LISTEN = 1.0
POLL_MIN, POLL_MAX = 0.05, 0.5

_listen_urls: dict[str, str | None] = {}


def encode_result(value: Any) -> tuple[str | None, str | None]:
    """(the value as JSON, None), or (None, why it cannot be kept)."""
    try:
        text = to_json(value, "return value")
    except TypeError as exc:
        return None, str(exc)
    if len(text) > MAX_RESULT_BYTES:
        return None, (f"job return value is {len(text) / 1e6:.1f} MB of JSON; the limit is "
                      f"{MAX_RESULT_BYTES / 1e6:g} MB: return a reference (an id, a path) instead")
    return text, None


def _outcome(job_id: int, rows: list[tuple[str, str | None, str | None]]) -> tuple[bool, Any]:
    """(ended, value) from RESULT_OF's rows; raises for every end that is not a value."""
    if not rows:
        raise LookupError(f"no job {job_id}: unknown, pruned after its keep ran out, or a success that was not "
                          "kept (enqueue with keep= to keep results)")
    state, text, error = rows[0]
    if state == "kept":
        if error is not None:
            raise ResultError(f"job {job_id} succeeded, but its return value was not kept: {error}")
        return True, None if text is None else json.loads(text)
    if state == "dead":
        raise JobDead(job_id, error)
    if state == "not kept":
        raise ResultNotKept(f"job {job_id} was enqueued without keep=: its success deletes it, so its result is "
                            "never stored (use @job(keep=...) or using(keep=...))")
    return False, None


def _listen_url(url: str) -> str | None:
    """Where to LISTEN for url's results, or None to poll (dj.pooler decides, once per process)."""
    if url not in _listen_urls:
        try:
            _listen_urls[url] = pooler.listen_target(url, config.listen_url())
        except Exception:  # noqa: BLE001 - a listen URL refused for workers is refused there; poll here
            _listen_urls[url] = None
    return _listen_urls[url]


def _check_timeout(job_id: int, deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"job {job_id} did not end in time")
    return left


def result(job_id: int, timeout: float | None = None, *, url: str | None = None) -> Any:
    """Wait for job `job_id` to end and return its value (see the module doc for what it raises)."""
    from .testing import jobs as testing_jobs

    captured = testing_jobs.active()
    if captured is not None:
        return captured.result(job_id)
    url = url or db.database_url()
    deadline = None if timeout is None else time.monotonic() + timeout
    with db.connection(url) as conn:
        ended, value = _outcome(job_id, conn.execute(sql.RESULT_OF, {"id": job_id}).fetchall())
    if ended:
        return value
    listen = _listen_url(url)
    wait = POLL_MIN
    with db.connect(listen, autocommit=True) if listen else db.connection(url) as conn:
        if listen:
            conn.execute("LISTEN " + sql.RESULTS_CHANNEL)
        while True:
            # Looked at after the LISTEN, so an end between the first look and the LISTEN is seen.
            ended, value = _outcome(job_id, conn.execute(sql.RESULT_OF, {"id": job_id}).fetchall())
            if ended:
                return value
            left = _check_timeout(job_id, deadline)
            if listen:
                pause = POLL_WITH_LISTEN if left is None else min(POLL_WITH_LISTEN, left)
                for note in conn.notifies(timeout=pause):
                    if str(job_id) in note.payload.split(","):
                        break
            else:
                time.sleep(wait if left is None else min(wait, left))
                wait = min(POLL_MAX, wait * 2)


async def result_async(job_id: int, timeout: float | None = None, *, url: str | None = None) -> Any:
    """result(), from async code: waits on this event loop, on an async connection."""
    from .testing import jobs as testing_jobs

    captured = testing_jobs.active()
    if captured is not None:
        return captured.result(job_id)
    url = url or db.database_url()
    deadline = None if timeout is None else time.monotonic() + timeout
    pool = db.loop_async_pool(url) or await db.async_pool(url)
    async with pool.connection() as conn:
        ended, value = _outcome(job_id, await (await conn.execute(sql.RESULT_OF, {"id": job_id})).fetchall())
        if ended:
            return value
        listen = await asyncio.to_thread(_listen_url, url)
        if listen is None:
            wait = POLL_MIN
            while True:
                left = _check_timeout(job_id, deadline)
                await asyncio.sleep(wait if left is None else min(wait, left))
                wait = min(POLL_MAX, wait * 2)
                ended, value = _outcome(job_id, await (await conn.execute(sql.RESULT_OF, {"id": job_id})).fetchall())
                if ended:
                    return value
    async with await psycopg.AsyncConnection.connect(listen, autocommit=True) as listener:
        await listener.execute("LISTEN " + sql.RESULTS_CHANNEL)
        while True:
            ended, value = _outcome(job_id, await (await listener.execute(sql.RESULT_OF, {"id": job_id})).fetchall())
            if ended:
                return value
            left = _check_timeout(job_id, deadline)
            pause = POLL_WITH_LISTEN if left is None else min(POLL_WITH_LISTEN, left)
            async for note in listener.notifies(timeout=pause):
                if str(job_id) in note.payload.split(","):
                    break
