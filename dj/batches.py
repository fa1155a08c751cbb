"""Batches: a group of jobs whose callback job runs once, when the last of them succeeds or dies."""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg

from . import connections, db, sql

if TYPE_CHECKING:
    from .connections import Conn

_current: contextvars.ContextVar["Batch | None"] = contextvars.ContextVar("dj_current_batch", default=None)

# The test mode's seam (dj/testing/), like dj.task's `_interceptor`: while set, batches open,
# close and record results through it, in memory.
_recorder: Any = None


def current_batch() -> "Batch | None":
    return _current.get()


class Batch:
    """`with dj.batch(on_complete=task, args=[...]) as b:` — every job enqueued inside joins it.

    The callback receives the batch's own args and kwargs plus `batch={"id", "total", "succeeded",
    "dead"}`. The batch is closed (its total fixed) when the block exits without an error.
    `async with` does the same from async code; `conn=` takes what enqueue's `conn=` takes (an
    async one for `async with`).
    """

    def __init__(self, on_complete: Any = None, args: list[Any] | tuple[Any, ...] = (),
                 kwargs: dict[str, Any] | None = None, queue: str | None = None, description: str | None = None,
                 conn: Conn | None = None):
        from .task import Enqueuer, to_json

        name = on_complete.name if isinstance(on_complete, Enqueuer) else on_complete
        if queue is None:
            queue = on_complete.options.queue if isinstance(on_complete, Enqueuer) else "default"
        self._row = (name, to_json(list(args), "args"), to_json(kwargs or {}, "kwargs"), queue, description)
        if conn is not None:
            connections.is_async(conn)  # a TypeError now for anything it cannot be
        self._conn = conn
        self.id: int | None = None
        self.total = 0
        self._token: contextvars.Token[Batch | None] | None = None

    def __enter__(self) -> Batch:
        if _recorder is not None:
            self.id = _recorder.open_batch(self)
        else:
            with db.borrow(self._conn) as conn:
                self.id = conn.execute(sql.OPEN_BATCH, self._row).fetchone()[0]  # type: ignore[index]
        self._token = _current.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._leave(exc_type):
            with db.borrow(self._conn) as conn:
                conn.execute(sql.CLOSE_BATCH, {"id": self.id, "total": self.total})

    async def __aenter__(self) -> Batch:
        if _recorder is not None:
            self.id = _recorder.open_batch(self)
        else:
            async with db.borrow_async(self._conn) as conn:
                self.id = (await (await conn.execute(sql.OPEN_BATCH, self._row)).fetchone())[0]  # type: ignore[index]
        self._token = _current.set(self)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._leave(exc_type):
            async with db.borrow_async(self._conn) as conn:
                await conn.execute(sql.CLOSE_BATCH, {"id": self.id, "total": self.total})

    def _leave(self, exc_type: type[BaseException] | None) -> bool:
        """Leave the block; whether to close the batch in the database (not when the block raised,
        nor in the test mode, which closes it in memory here)."""
        if self._token is not None:
            _current.reset(self._token)
        if exc_type is not None:
            return False
        if _recorder is not None:
            _recorder.close_batch(self)
            return False
        return True


def batch(on_complete: Any = None, args: list[Any] | tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
          **options: Any) -> Batch:
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
        _recorder.record_result(batch_id, result)
        return
    with db.transaction() as conn:
        conn.execute("UPDATE batches SET result = %s::jsonb WHERE id = %s", (to_json(result, "result"), batch_id))
