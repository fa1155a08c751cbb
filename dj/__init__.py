"""dj: DelayedJob, done right, in Python. Jobs are rows in PostgreSQL; workers claim them with
SELECT ... FOR UPDATE SKIP LOCKED."""

from .admin import status
from . import batches
from .batches import batch, current_batch
from .context import JobContext, current_job
from .db import connect, connection, database_url, transaction, use_database
from .errors import DatabaseUnavailable, DJError, Permanent, SchemaMissing, WorkFailed
from .supervisor import run_workers
from .task import Task, enqueue, job
from .worker import Worker



def migrate(url: str | None = None) -> str:
    """Bring dj's schema (and the workload's) to the newest revision; idempotent. Returns the head."""
    from .schema import migrate as upgrade  # Alembic is heavy; only migrate needs it

    return upgrade(url)


__all__ = [
    "DJError", "DatabaseUnavailable", "JobContext", "Permanent", "SchemaMissing", "Task", "Worker", "WorkFailed",
    "batch", "batches", "connect", "connection", "current_batch", "current_job", "database_url", "enqueue", "job", "migrate", "run_workers", "status", "transaction",
    "use_database",
]
