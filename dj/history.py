"""The history: kept successes (job_results), as `dj jobs list --state succeeded`, `dj jobs show`,
the dashboard's History page, `dj status` and /metrics read them. Rows come in the shape of
dj.admin's job rows (state 'succeeded'), plus the result, its run time and when it expires."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

STATE = "succeeded"

_COLUMNS = ("id, queue, priority, task, args, kwargs, run_at, attempts, max_attempts, NULL::float8 AS timeout,"
            " NULL::timestamptz AS locked_at, NULL::text AS locked_by, NULL::timestamptz AS failed_at,"
            " NULL::text AS last_error, created_at, NULL::text AS unique_key, batch_id, NULL::jsonb AS progress,"
            " 'succeeded' AS state, finished_at, expires_at, run_seconds, result, result_error")

# Per queue: kept rows not pruned yet. Counted exactly up to COUNT_CAP rows, so that `dj status`,
# each /metrics scrape and the dashboard stay cheap when days of history pile up (a full count of
# 10M kept rows reads their whole heap, seconds each time). Beyond the cap the total is the
# planner's estimate of the table's rows (the density seen by the last VACUUM or ANALYZE, scaled
# to the table's current size, so it follows growth without one), shared among the queues as in
# the rows counted.
COUNT_CAP = 100_000
_COUNTS = "SELECT queue, count(*) FROM (SELECT queue FROM job_results LIMIT %s) AS r GROUP BY queue ORDER BY queue"
_ESTIMATE = "EXPLAIN (FORMAT JSON) SELECT FROM job_results"


def available(conn: psycopg.Connection) -> bool:
    """Whether the schema has job_results (it came with migration 0013)."""
    return conn.execute("SELECT to_regclass('job_results') IS NOT NULL").fetchone()[0]  # type: ignore[index,no-any-return]


def counts(conn: psycopg.Connection) -> tuple[dict[str, int], bool]:
    """({queue: kept successes}, whether those are estimates); empty on a schema without job_results."""
    if not available(conn):
        return {}, False
    counted = {queue: n for queue, n in conn.execute(_COUNTS, (COUNT_CAP + 1,)).fetchall()}
    seen = sum(counted.values())
    if seen <= COUNT_CAP:
        return counted, False
    total = max(seen, int(conn.execute(_ESTIMATE).fetchone()[0][0]["Plan"]["Plan Rows"]))  # type: ignore[index]
    return {queue: round(n * total / seen) for queue, n in counted.items()}, True


def list_results(conn: psycopg.Connection, queue: str | None = None, task: str | None = None, limit: int = 50,
                 *, after_id: int | None = None, before_id: int | None = None) -> list[dict[str, Any]]:
    """Kept successes in id order, filtered by queue and task (exact, or a task name containing
    `task` when it has a `%`), paged by id as dj.admin.list_jobs pages."""
    where: list[str] = []
    params: list[Any] = []
    if queue is not None:
        where.append("queue = %s")
        params.append(queue)
    if task is not None:
        where.append("task LIKE %s" if "%" in task else "task = %s")
        params.append(task)
    if after_id is not None:
        where.append("id > %s")
        params.append(after_id)
    if before_id is not None:
        where.append("id < %s")
        params.append(before_id)
    query = f"SELECT {_COLUMNS} FROM job_results"
    if where:
        query += " WHERE " + " AND ".join(where)
    backwards = before_id is not None and after_id is None
    query += f" ORDER BY id {'DESC' if backwards else ''} LIMIT %s"
    params.append(limit)
    if not available(conn):
        return []
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    return rows[::-1] if backwards else rows


def get_result(conn: psycopg.Connection, job_id: int) -> dict[str, Any] | None:
    """One kept success, or None."""
    if not available(conn):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(f"SELECT {_COLUMNS} FROM job_results WHERE id = %s", (job_id,)).fetchone()
