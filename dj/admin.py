"""Looking at and managing jobs: status, list, show, retry, cancel, and pausing queues. The CLI, the
web dashboard and users call these."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .errors import DJError
from . import dependencies, history, rates, snapshot, sql
from .sql import QUEUE_SETTINGS_CHANNEL

STATES = ("ready", "scheduled", "running", "dead", "waiting")
# What `dj jobs list --state` takes: the states of jobs, and kept successes (dj/history.py).
LIST_STATES = (*STATES, history.STATE)

# The states are disjoint; this is the one place that defines them. A waiting job's dependencies
# have not all succeeded yet (dj/dependencies.py): it sits at run_at 'infinity' until they have.
STATE_SQL = {
    "dead": "failed_at IS NOT NULL",
    "running": "failed_at IS NULL AND locked_by IS NOT NULL",
    "waiting": "failed_at IS NULL AND locked_by IS NULL AND run_at = 'infinity'",
    "scheduled": "failed_at IS NULL AND locked_by IS NULL AND run_at > now() AND run_at <> 'infinity'",
    "ready": "failed_at IS NULL AND locked_by IS NULL AND run_at <= now()",
}
COUNTED = ("ready", "scheduled", "running", "dead", "retrying", "waiting")  # in status, in this order
RETRYING_SQL = "failed_at IS NULL AND locked_by IS NULL AND attempts > 0"

_COUNTS = f"""
SELECT queue,
       count(*) FILTER (WHERE {STATE_SQL['ready']}) AS ready,
       count(*) FILTER (WHERE {STATE_SQL['scheduled']}) AS scheduled,
       count(*) FILTER (WHERE {STATE_SQL['running']}) AS running,
       count(*) FILTER (WHERE {STATE_SQL['dead']}) AS dead,
       count(*) FILTER (WHERE {RETRYING_SQL}) AS retrying,
       count(*) FILTER (WHERE {STATE_SQL['waiting']}) AS waiting,
       coalesce(extract(epoch FROM now() - min(run_at) FILTER (WHERE {STATE_SQL['ready']})), 0)::float8
           AS oldest_ready_age_s
FROM jobs GROUP BY queue ORDER BY queue
"""

_WORKERS = """
SELECT w.name, w.queues, count(j.id)::int AS running,
       extract(epoch FROM now() - w.heartbeat_at)::float8 AS heartbeat_age_s
FROM workers w LEFT JOIN jobs j ON j.locked_by = w.name AND j.failed_at IS NULL
GROUP BY w.name ORDER BY w.name
"""

_THROUGHPUT = """
SELECT coalesce(sum(succeeded), 0)::bigint, coalesce(sum(failed), 0)::bigint
FROM job_stats WHERE bucket > now() - interval '60 seconds'
"""

# run_at: NULL for a waiting job, whose 'infinity' no Python datetime can hold.
_COLUMNS = ("id, queue, priority, task, args, kwargs, nullif(run_at, 'infinity') AS run_at, attempts, max_attempts, timeout, locked_at,"
            " locked_by, failed_at, last_error, created_at, unique_key, batch_id, progress, limit_key, key_limit")


def status(conn: psycopg.Connection) -> dict[str, Any]:
    """The `dj status --json` document (see DESIGN.md)."""
    queues: dict[str, dict[str, Any]] = {}
    totals = dict.fromkeys(COUNTED, 0)
    for row in conn.execute(_COUNTS).fetchall():
        q: dict[str, Any] = dict(zip(COUNTED, row[1:7]))
        q["oldest_ready_age_s"] = round(row[7], 3)
        queues[row[0]] = q
        for k in totals:
            totals[k] += q[k]
    workers = [
        {"name": name, "queues": list(qs), "running": running, "heartbeat_age_s": round(age, 3)}
        for name, qs, running, age in conn.execute(_WORKERS).fetchall()
    ]
    succeeded, failed = conn.execute(_THROUGHPUT).fetchone()
    return {
        "queues": queues,
        "totals": totals,
        "workers": workers,
        "throughput": {"succeeded_last_minute": succeeded, "failed_last_minute": failed},
        # Added with issue 12: the session whose snapshot holds back vacuum of jobs, or null.
        "oldest_snapshot": snapshot.oldest(conn),
        # Added with issue 15: kept successes (jobs enqueued with keep=) not pruned yet.
        "succeeded": _succeeded(conn),
        # Added with issue 15: the keys of per-key limits that are at their limit, and the ready
        # jobs each holds back (the most first; at most KEYS_SHOWN keys, `held` counted to 10,000).
        "keys_at_limit": keys_at_limit(conn),
        # Added with issue 15: every rate limit in force (a queue's, a task's that ran in the last
        # hour), with the starts its current window has used (dj/rates.py).
        "rate_limits": rates.usage(conn),
    }


def _succeeded(conn: psycopg.Connection) -> dict[str, Any]:
    by_queue, estimated = history.counts(conn)
    # `estimated` (added in session 6): past history.COUNT_CAP kept rows, the counts are the planner's.
    return {"total": sum(by_queue.values()), "queues": by_queue, "estimated": estimated}


KEYS_SHOWN = 20


def keys_at_limit(conn: psycopg.Connection, top: int = KEYS_SHOWN) -> list[dict[str, Any]]:
    """Keys with as many running jobs as their limit allows, and how many ready jobs wait for them."""
    return [{"key": key, "queue": queue, "running": running, "limit": limit, "held": held}
            for key, queue, running, limit, held in conn.execute(sql.KEYS_AT_LIMIT, {"top": top}).fetchall()]


def list_jobs(conn: psycopg.Connection, state: str | None = None, queue: str | None = None,
              limit: int = 50, *, task: str | None = None, after_id: int | None = None,
              before_id: int | None = None) -> list[dict[str, Any]]:
    """Jobs in id order. `after_id` / `before_id` page forwards / backwards (keyset paging)."""
    where: list[str] = []
    params: list[Any] = []
    if limit < 1:
        raise DJError("--limit must be a positive integer")
    if state == history.STATE:
        return history.list_results(conn, queue, task, limit, after_id=after_id, before_id=before_id)
    if state is not None:
        if state not in STATE_SQL:
            raise DJError(f"unknown state {state!r}; choose one of {', '.join(LIST_STATES)}")
        where.append(STATE_SQL[state])
    if queue is not None:
        where.append("queue = %s")
        params.append(queue)
    if task is not None:
        where.append("task = %s")
        params.append(task)
    if after_id is not None:
        where.append("id > %s")
        params.append(after_id)
    if before_id is not None:
        where.append("id < %s")
        params.append(before_id)
    if limit < 1:
        raise DJError("--limit must be a positive integer")
    query = f"SELECT {_COLUMNS}, {_state_expr()} AS state FROM jobs"
    if where:
        query += " WHERE " + " AND ".join(where)
    # Paging backwards reads the ids just below `before_id`, nearest first, then restores id order.
    backwards = before_id is not None and after_id is None
    query += f" ORDER BY id {'DESC' if backwards else ''} LIMIT %s"
    params.append(limit)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    return rows[::-1] if backwards else rows


def get_job(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_COLUMNS}, {_state_expr()} AS state FROM jobs WHERE id = %s",
                          (job_id,)).fetchone()
    if row is None:
        row = history.get_result(conn, job_id)
        if row is None:
            raise DJError(f"no job {job_id} (finished jobs are deleted, unless kept with keep= until it runs out)")
        row["waits_for"] = []  # it succeeded: whatever it waited for had succeeded
        return row
    row["waits_for"] = dependencies.waits_for(conn, job_id)
    return row


def retry(conn: psycopg.Connection, job_id: int) -> None:
    """Make a dead, scheduled or waiting job ready now, with a fresh set of attempts. A job waiting
    for dependencies stops waiting for them."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE jobs SET failed_at = NULL, run_at = now(), attempts = 0 "
            "WHERE id = %s AND locked_by IS NULL RETURNING queue", (job_id,)).fetchone()
        if row is not None:
            conn.execute("DELETE FROM job_dependencies WHERE job_id = %s", (job_id,))
    if row is None:
        if get_job(conn, job_id)["state"] == history.STATE:  # raises if missing
            raise DJError(f"job {job_id} succeeded; enqueue it again instead")
        raise DJError(f"job {job_id} is running; it cannot be retried now")
    conn.execute(sql.NOTIFY, (row[0],))


def retry_dead(conn: psycopg.Connection, queue: str | None = None) -> int:
    rows = conn.execute(
        "UPDATE jobs SET failed_at = NULL, run_at = now(), attempts = 0 "
        "WHERE failed_at IS NOT NULL AND (%s::text IS NULL OR queue = %s) RETURNING queue",
        (queue, queue)).fetchall()
    for q in sorted({r[0] for r in rows}):
        conn.execute(sql.NOTIFY, (q,))
    return len(rows)


def cancel(conn: psycopg.Connection, job_id: int) -> None:
    """Delete a job that is not running. A job of a batch counts towards it as dead."""
    if conn.execute(sql.CANCEL, {"id": job_id}).fetchone()[0] == 0:
        if get_job(conn, job_id)["state"] == history.STATE:
            raise DJError(f"job {job_id} succeeded already; it is kept until its keep runs out")
        raise DJError(f"job {job_id} is running; it cannot be cancelled")


# --- queues: pause and resume ---------------------------------------------------------------------

# Pausing or resuming a queue sends NOTIFY on QUEUE_SETTINGS_CHANNEL, payload {"queue": ...,
# "paused": ...}, so running workers can react at once (stop claiming, hand back what they buffered).


def pause_queue(conn: psycopg.Connection, queue: str) -> None:
    """Pause a queue: workers claim none of its jobs until it is resumed. Running jobs finish."""
    _set_paused(conn, queue, True)


def resume_queue(conn: psycopg.Connection, queue: str) -> None:
    """Resume a paused queue, and wake idle workers as an enqueue would."""
    _set_paused(conn, queue, False)


def queue_settings(conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """{queue: {"paused": bool, "concurrency_limit": int | None}} for queues that have a row.
    A queue without a row is active and unlimited. (Rate limits: dj.rates.queue_rates.)"""
    rows = conn.execute("SELECT queue, paused, concurrency_limit FROM queue_settings ORDER BY queue").fetchall()
    return {q: {"paused": paused, "concurrency_limit": limit} for q, paused, limit in rows}


def _set_paused(conn: psycopg.Connection, queue: str, paused: bool) -> None:
    if not queue:
        raise DJError("a queue name cannot be empty")
    with conn.transaction():  # the NOTIFYs go out with the change, at commit
        conn.execute(
            "INSERT INTO queue_settings (queue, paused) VALUES (%s, %s) "
            "ON CONFLICT (queue) DO UPDATE SET paused = EXCLUDED.paused", (queue, paused))
        conn.execute("SELECT pg_notify(%s, %s)",
                     (QUEUE_SETTINGS_CHANNEL, json.dumps({"queue": queue, "paused": paused})))
        if not paused:
            conn.execute(sql.NOTIFY, (queue,))


def _state_expr() -> str:
    return ("CASE " + " ".join(f"WHEN {cond} THEN '{name}'" for name, cond in STATE_SQL.items())
            + " END")


def set_concurrency_limit(conn: psycopg.Connection, queue: str, limit: int | None) -> None:
    """Cap the running jobs of `queue` across all workers and hosts; None removes the cap."""
    if limit is not None and limit < 0:
        raise DJError("a queue limit must be 0 or more")
    with conn.transaction():
        conn.execute("INSERT INTO queue_settings (queue, concurrency_limit) VALUES (%s, %s)"
                     " ON CONFLICT (queue) DO UPDATE SET concurrency_limit = EXCLUDED.concurrency_limit",
                     (queue, limit))
        conn.execute(sql.NOTIFY, (queue,))


def running_progress(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Running jobs that have reported progress."""
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT id, queue, task, locked_by, (progress->>'fraction')::float8 AS fraction,"
            " progress->>'message' AS message FROM jobs"
            " WHERE locked_by IS NOT NULL AND failed_at IS NULL AND progress IS NOT NULL ORDER BY id").fetchall()


def pending(conn: psycopg.Connection, queues: list[str]) -> int:
    """Jobs in `queues` that a burst worker still has to run: ready or running."""
    return conn.execute(
        f"SELECT count(*) FROM jobs WHERE queue = ANY(%s) AND ({STATE_SQL['ready']} OR {STATE_SQL['running']})",
        (queues,)).fetchone()[0]
