"""dj: DelayedJob, done right, in Python. Jobs are rows in PostgreSQL; workers claim them with
SELECT ... FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The names below are imported on first use, not here. pytest imports dj.pytest_plugin (which
# runs this file) in every run where dj is installed, tests that use dj or not, and the modules
# behind these names cost ~180 ms (psycopg, the worker).
_EXPORTS = {
    "status": "admin",
    "Batch": "batches", "batch": "batches", "current_batch": "batches",
    "BatchRef": "dependencies", "UnknownDependency": "dependencies",
    "JobContext": "context", "current_job": "context",
    "connect": "db", "connection": "db", "database_url": "db", "transaction": "db", "use_database": "db",
    "DatabaseUnavailable": "errors", "DJError": "errors", "Permanent": "errors", "SchemaMissing": "errors",
    "WorkFailed": "errors", "JobDead": "errors", "ResultError": "errors", "ResultNotKept": "errors",
    "result": "results", "result_async": "results",
    "run_workers": "supervisor",
    "Task": "task", "enqueue": "task", "job": "task",
    "Worker": "worker",
}

if TYPE_CHECKING:
    from . import batches, testing
    from .admin import status
    from .batches import Batch, batch, current_batch
    from .dependencies import BatchRef, UnknownDependency
    from .context import JobContext, current_job
    from .db import connect, connection, database_url, transaction, use_database
    from .errors import DatabaseUnavailable, DJError, JobDead, Permanent, ResultError, ResultNotKept, SchemaMissing, \
        WorkFailed
    from .results import result, result_async
    from .supervisor import run_workers
    from .task import Task, enqueue, job
    from .worker import Worker


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    elif name.isidentifier() and not name.startswith("_"):
        # A submodule, as `dj.task` or `dj.testing` after a bare `import dj`.
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def migrate(url: str | None = None) -> str:
    """Bring dj's schema (and the workload's) to the newest revision; idempotent. Returns the head."""
    from .schema import migrate as upgrade  # Alembic is heavy; only migrate needs it

    return upgrade(url)


__all__ = [
    "Batch", "BatchRef", "DJError", "DatabaseUnavailable", "JobContext", "JobDead", "Permanent", "ResultError",
    "ResultNotKept", "SchemaMissing", "Task", "Worker", "WorkFailed",
    "batch", "batches", "connect", "connection", "current_batch", "current_job", "database_url", "enqueue", "job",
    "migrate", "result", "result_async", "run_workers", "status", "testing", "transaction", "UnknownDependency",
    "use_database",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
