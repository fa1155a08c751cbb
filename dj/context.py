"""What a running job can learn about itself: `dj.current_job()`."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class JobContext:
    id: int
    task: str
    queue: str
    attempt: int
    worker: str

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far this job has got (0.0 to 1.0); `dj status` and the dashboard show it."""
        from . import db, sql

        with db.transaction() as conn:
            conn.execute(sql.PROGRESS, (float(fraction), message, self.id, self.attempt, self.worker))

    async def progress_async(self, fraction: float, message: str = "") -> None:
        """progress() for an async job, without holding up the worker's event loop: the update (one
        short transaction) runs in a thread. Plain progress() works in an async job too, but
        blocks the loop, and so the worker's other async jobs, for that round trip."""
        import asyncio

        await asyncio.to_thread(self.progress, fraction, message)


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("dj_current_job", default=None)


def current_job() -> JobContext | None:
    """The job this thread, or this asyncio task, is running; None outside a job."""
    return _current.get()


def _set_current(ctx: JobContext | None, token: contextvars.Token | None = None):
    if token is not None:
        _current.reset(token)
        return None
    return _current.set(ctx)
