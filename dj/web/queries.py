"""What the dashboard reads beyond dj.admin: per-minute throughput and worker details.

Job states, counts, listing, retry and cancel are dj.admin's; this module only adds what the
dashboard alone shows.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .. import admin

MINUTES = 60

# Succeeded and failed attempts per minute over the last hour, from job_stats' 10-second buckets.
# minutes_ago 0 is the current, partial minute.
_PER_MINUTE = """
WITH m AS (SELECT date_bin('1 minute', now(), timestamptz '2000-01-01') AS cur)
SELECT (extract(epoch FROM m.cur - date_bin('1 minute', s.bucket, timestamptz '2000-01-01')) / 60)::int
           AS minutes_ago,
       sum(s.succeeded)::bigint, sum(s.failed)::bigint
FROM job_stats s, m
WHERE s.bucket >= m.cur - interval '59 minutes' AND s.bucket < m.cur + interval '1 minute'
GROUP BY 1
"""

_WORKER_DETAILS = "SELECT name, host, pid, concurrency, started_at FROM workers"

STALE_AFTER_S = 30.0

_ZERO_COUNTS = {"ready": 0, "scheduled": 0, "running": 0, "dead": 0, "retrying": 0, "waiting": 0,
                "oldest_ready_age_s": 0.0}


def per_minute(conn: psycopg.Connection) -> list[tuple[int, int]]:
    """(succeeded, failed) for each of the last 60 minutes, oldest first; the last is this minute."""
    series = [(0, 0)] * MINUTES
    for minutes_ago, succeeded, failed in conn.execute(_PER_MINUTE).fetchall():
        if 0 <= minutes_ago < MINUTES:
            series[MINUTES - 1 - minutes_ago] = (int(succeeded), int(failed))
    return series


def overview(conn: psycopg.Connection) -> dict[str, Any]:
    """dj.admin.status plus, per queue, whether it is paused and its rate limit ("100/min", None)
    with the starts its current window used. A queue with settings and no jobs is listed."""
    doc = admin.status(conn)
    settings = admin.queue_settings(conn)
    rates = {r["name"]: r for r in doc["rate_limits"] if r["scope"] == "queue"}
    queues = []
    for name in sorted(set(doc["queues"]) | set(settings)):
        counts = doc["queues"].get(name, _ZERO_COUNTS)
        rate = rates.get(name)
        queues.append({"name": name, **counts, "paused": settings.get(name, {}).get("paused", False),
                       "rate": rate["rate"] if rate else None, "rate_used": rate["used"] if rate else None})
    return {**doc, "queues": queues}


def workers(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every registered worker: status's view (running jobs, heartbeat age) plus host, pid, start."""
    details = {row[0]: row for row in conn.execute(_WORKER_DETAILS).fetchall()}
    out = []
    for w in admin.status(conn)["workers"]:
        name, host, pid, concurrency, started_at = details.get(w["name"], (w["name"], "?", None, None, None))
        out.append({**w, "host": host, "pid": pid, "concurrency": concurrency, "started_at": started_at,
                    "stale": w["heartbeat_age_s"] > STALE_AFTER_S})
    return out
