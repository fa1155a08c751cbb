"""The oldest snapshot in dj's database, for `dj status`, the dashboard, `/metrics`, `dj doctor`
and the workers' warning.

While a session holds a snapshot (a REPEATABLE READ report, `pg_dump`, a connection left idle in
a transaction), vacuum keeps every row version deleted after it was taken: the jobs table grows,
and dead index entries pile up where claims read. Nothing in dj can end that session; it can only
tell the operator which one it is.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import psycopg

from . import sql

log = logging.getLogger("dj.worker")

DEFAULT_WARN_AFTER = 60.0


def oldest(conn: psycopg.Connection) -> dict[str, Any] | None:
    """{age_s, pid, application_name, state, query (its first line)} of the session holding the
    oldest snapshot in this database, or None if no other session holds one."""
    row = conn.execute(sql.OLDEST_SNAPSHOT).fetchone()
    if row is None:
        return None
    pid, app, state, query, age = row
    return {"age_s": round(age, 3), "pid": pid, "application_name": app or "", "state": state or "",
            "query": query or ""}


def warn_after() -> float:
    """DJ_SNAPSHOT_WARN_AFTER (seconds), else 60."""
    text = os.environ.get("DJ_SNAPSHOT_WARN_AFTER", "").strip()
    try:
        return float(text) if text else DEFAULT_WARN_AFTER
    except ValueError:
        return DEFAULT_WARN_AFTER


def describe(s: dict[str, Any]) -> str:
    """One line about a snapshot for logs and tables."""
    app = f" ({s['application_name']})" if s["application_name"] else ""
    query = s["query"] if len(s["query"]) <= 80 else s["query"][:77] + "..."
    return f"pid {s['pid']}{app}, {s['state'] or 'unknown state'}, {s['age_s']:.0f} s old: {query!r}"


class SnapshotWarning:
    """A worker's one warning per old snapshot: logged when the oldest snapshot passes `after`
    seconds, not again while it stays, and again only after it has cleared and an old one recurs."""

    def __init__(self, after: float | None = None):
        self.after = warn_after() if after is None else after
        self.warned_pid: int | None = None

    def check(self, conn: psycopg.Connection) -> dict[str, Any] | None:
        s = oldest(conn)
        old = s is not None and s["age_s"] >= self.after
        if old and self.warned_pid is None:
            self.warned_pid = s["pid"]
            log.warning("a snapshot older than %gs holds back vacuum of jobs: %s; the jobs table grows and "
                        "claims slow down until that transaction ends", self.after, describe(s),
                        extra={"event": "old_snapshot", "pid": s["pid"], "age_s": s["age_s"]})
        elif not old and self.warned_pid is not None:
            log.info("the old snapshot (pid %d) is gone", self.warned_pid, extra={"event": "old_snapshot_cleared"})
            self.warned_pid = None
        return s
