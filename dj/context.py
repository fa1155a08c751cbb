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


_current: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("dj_current_job", default=None)


def current_job() -> JobContext | None:
    """The job this thread is running, or None outside a job."""
    return _current.get()


def _set_current(ctx: JobContext | None, token: contextvars.Token | None = None):
    if token is not None:
        _current.reset(token)
        return None
    return _current.set(ctx)
