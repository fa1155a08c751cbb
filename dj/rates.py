"""Rate limits: at most N claims of a queue's jobs (`dj queue rate NAME 100/min`) or of a task's
(`@job(rate="10/s")`) in any window of one period (1 s, 1 min or 1 h), across all workers and hosts.

A claim is the start that a rate limit counts: the moment a worker locks the job (its locked_at).
A job starts running on the worker a little later, once a thread is free.

How it holds (dj/sql.py has the statements):
- Every claim that may take jobs of a limited key (a queue, or a task) first takes that key's
  transaction-scoped advisory lock, so claims of one key run one after another.
- Under the lock, the claim counts the key's starts whose time lies in the last period, in the
  sliding log `rate_starts` (one row per claim: time and count), and claims at most what is left.
  Its own row goes into the log in the same statement, and so commits with the claim or not at all.
- So take any window of one period, and the last claim whose time falls in it: the claims in the
  window before it committed before it took the lock, and their times are after its time minus a
  period, so it counted all of them and took at most the rest. No window sees more than N.
- A worker killed with kill -9 changes nothing: its claims are in the log, committed; a job reaped
  from it and claimed again is a new start and counts again.
- A claim's time is read after the lock was granted, so one key's claims have increasing times,
  and a row that has left the window of one claim has left every later claim's: the log is pruned
  under the lock, and of rows older than the longest period by maintenance.

A job held back stays ready and keeps its place: a queue's claim takes its first jobs in claim
order, as many as the limit allows; a task's jobs are skipped while it has no allowance, so the
queue's other jobs are not held back, and the worker reads its queues from the head again when the
window frees a slot. A worker that finds a key used up while its jobs wait sleeps until the oldest
start in the window leaves it (RATE_WAIT), instead of polling; `dj work --burst` waits the same
way and does not exit while rate-held jobs remain.

A task's limit comes from the code of the workers that run it: each worker enforces the limit it
was given, so all of them should import the same definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import psycopg

from . import sql
from .errors import DJError

PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "m": 60.0, "minute": 60.0,
           "h": 3600.0, "hour": 3600.0}
UNIT_NAMES = {1.0: "s", 60.0: "min", 3600.0: "h"}
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """At most `limit` starts in any window of `period` seconds."""

    limit: int
    period: float

    def __str__(self) -> str:
        return f"{self.limit}/{UNIT_NAMES.get(self.period, f'{self.period:g}s')}"


def parse(spec: str) -> Rate:
    """"100/min", "10/s", "5/h" (also /sec, /second, /minute, /hour). Raises ValueError, saying
    what is accepted."""
    m = _SPEC.match(spec.lower()) if isinstance(spec, str) else None
    if m is None or m.group(2) not in PERIODS:
        raise ValueError(f"bad rate {spec!r}: write N/s, N/min or N/h, for example 100/min")
    limit = int(m.group(1))
    if limit < 1 or limit > 2**31 - 1:
        raise ValueError(f"bad rate {spec!r}: the number of starts must be from 1 to {2**31 - 1}")
    return Rate(limit, PERIODS[m.group(2)])


def set_queue_rate(conn: psycopg.Connection, queue: str, rate: str | Rate | None) -> Rate | None:
    """Limit how many jobs of `queue` start in any window of the rate's period, across all workers
    and hosts. `rate` is a spec ("100/min"), a Rate, or None (or "off") to remove the limit.
    Raises DJError for a bad spec, changing nothing."""
    if not queue:
        raise DJError("a queue name cannot be empty")
    if isinstance(rate, str):
        try:
            rate = None if rate.strip().lower() == "off" else parse(rate)
        except ValueError as exc:
            raise DJError(str(exc)) from None
    limit, period = (rate.limit, rate.period) if rate is not None else (None, None)
    with conn.transaction():
        conn.execute("INSERT INTO queue_settings (queue, rate_limit, rate_period) VALUES (%s, %s, %s)"
                     " ON CONFLICT (queue) DO UPDATE"
                     " SET rate_limit = EXCLUDED.rate_limit, rate_period = EXCLUDED.rate_period",
                     (queue, limit, period))
        conn.execute(sql.NOTIFY, (queue,))  # a raised or removed limit may free jobs at once
    return rate


def queue_rates(conn: psycopg.Connection) -> dict[str, Rate]:
    """{queue: its Rate} for the queues with a rate limit."""
    rows = conn.execute("SELECT queue, rate_limit, rate_period FROM queue_settings"
                        " WHERE rate_limit IS NOT NULL ORDER BY queue").fetchall()
    return {q: Rate(limit, period) for q, limit, period in rows}


_USAGE = """
SELECT k.key, k.max_starts, k.period,
       coalesce((SELECT sum(r.n) FROM rate_starts r
                 WHERE r.key = k.key AND r.started_at > clock_timestamp() - k.period * interval '1 second'), 0)::int8
FROM (
    SELECT 'queue:' || queue AS key, rate_limit AS max_starts, rate_period AS period
    FROM queue_settings WHERE rate_limit IS NOT NULL
    UNION ALL
    (SELECT DISTINCT ON (key) key, max_starts, period  -- the limit of a task's latest claim
     FROM rate_starts WHERE key LIKE 'task:%%' AND started_at > clock_timestamp() - interval '1 hour'
     ORDER BY key, started_at DESC)
) AS k
ORDER BY k.key
"""


def usage(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every rate limit in force: queues' (from queue_settings), and tasks' that claimed a job in the
    last hour (a task's limit lives in code, so the log is where it shows). With the starts in the
    current window (the period up to now)."""
    out = []
    for key, limit, period, used in conn.execute(_USAGE).fetchall():
        scope, _, name = key.partition(":")
        out.append({"scope": scope, "name": name, "rate": str(Rate(limit, period)), "limit": limit,
                    "period_s": period, "used": used})
    return out
