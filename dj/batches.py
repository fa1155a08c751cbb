"""Batches: a group of jobs whose callback job runs once, when the last of them succeeds or dies."""

from __future__ import annotations

import contextvars
from typing import Any

import psycopg

from . import db, sql

_current: contextvars.ContextVar["Batch | None"] = contextvars.ContextVar("dj_current_batch", default=None)

# The test mode's seam (dj/testing.py), like dj.task's `_interceptor`: while set, batches open,
# close and record results through it, in memory.
_recorder: Any = None


def current_batch() -> "Batch | None":
    return _current.get()


class Batch:
    """`with dj.batch(on_complete=task, args=[...]) as b:` — every job enqueued inside joins it.

    The callback receives the batch's own args and kwargs plus `batch={"id", "total", "succeeded",
    "dead"}`. The batch is closed (its total fixed) when the block exits without an error.
    """

    def __init__(self, on_complete: Any = None, args: list | tuple = (), kwargs: dict | None = None,
                 queue: str | None = None, description: str | None = None, conn: psycopg.Connection | None = None):
        from .task import Enqueuer, to_json

        name = on_complete.name if isinstance(on_complete, Enqueuer) else on_complete
        if queue is None:
            queue = on_complete.options.queue if isinstance(on_complete, Enqueuer) else "default"
        self._row = (name, to_json(list(args), "args"), to_json(kwargs or {}, "kwargs"), queue, description)
        self._conn = conn
        self.id: int | None = None
        self.total = 0
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "Batch":
        if _recorder is not None:
            self.id = _recorder.open_batch(self)
        else:
            with db.borrow(self._conn) as conn:
                self.id = conn.execute(sql.OPEN_BATCH, self._row).fetchone()[0]
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _current.reset(self._token)
        if exc_type is not None:
            return
        if _recorder is not None:
            return _recorder.close_batch(self)
        with db.borrow(self._conn) as conn:
            conn.execute(sql.CLOSE_BATCH, {"id": self.id, "total": self.total})


def batch(on_complete: Any = None, args: list | tuple = (), kwargs: dict | None = None, **options: Any) -> Batch:
    return Batch(on_complete, args, kwargs, **options)


def show(conn: psycopg.Connection, batch_id: int) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute("SELECT b.*, (SELECT count(*) FROM jobs j WHERE j.batch_id = b.id AND j.failed_at IS NULL)"
                          " AS pending FROM batches b WHERE b.id = %s", (batch_id,)).fetchone()
    return row


def record_result(batch_id: int, result: Any) -> None:
    """Store a JSON result on a batch (a callback records what it found)."""
    from .task import to_json

    if _recorder is not None:
        return _recorder.record_result(batch_id, result)
    with db.transaction() as conn:
        conn.execute("UPDATE batches SET result = %s::jsonb WHERE id = %s", (to_json(result, "result"), batch_id))
