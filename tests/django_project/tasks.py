"""Django tasks for tests/test_django_tasks.py. Workers find them through autodiscovery of the
installed app's `tasks` module."""

from django.db import connection

import dj
from dj.contrib.django.compat import TaskContext

try:
    from django.tasks import task
except ImportError:
    from django_tasks import task


def _record(marker: str, attempt: int | None = None) -> None:
    job = dj.current_job()
    with connection.cursor() as cur:  # Django's own connection, as a task's ORM code would use
        cur.execute("INSERT INTO test_runs (job_id, marker, attempt, pid) VALUES (%s, %s, %s, pg_backend_pid())",
                    [job.id if job else 0, marker, attempt if attempt is not None else (job.attempt if job else 0)])


@task()
def record(marker: str) -> None:
    _record(marker)


@task()
def explode(marker: str) -> None:
    _record(marker)
    raise ValueError(f"boom {marker}")


@task()
async def record_async(marker: str) -> None:
    from asgiref.sync import sync_to_async

    await sync_to_async(_record)(marker)  # the ORM from async code, as Django wants it


@task(takes_context=True)
def with_context(context: TaskContext, marker: str) -> None:
    _record(marker, context.attempt)
