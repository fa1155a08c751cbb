"""`dj.contrib.django.Backend`: Django's Tasks framework on dj.

    TASKS = {"default": {"BACKEND": "dj.contrib.django.Backend",
                         "QUEUES": ["default", "mail"],           # optional, the framework's own
                         "OPTIONS": {"DATABASE": "default",       # Django's alias to enqueue on
                                     "MAX_ATTEMPTS": 25}}}        # dj's retries

- Enqueue writes a dj job on Django's own connection (`DATABASES[DATABASE]`, PostgreSQL on
  psycopg 3): inside `transaction.atomic()` the job belongs to that transaction, so a rollback
  leaves no job and workers are woken at commit; outside it, it commits at once.
- Each Django task becomes a dj task named by its module path (`myapp.tasks.send_mail`),
  registered when the task is defined: a worker runs only tasks its process imported, never a
  path read from the database.
- Priority: Django's -100..100 runs higher first, dj runs lower first, so dj's priority is the
  negated Django priority (Django 100 -> dj -100, Django -100 -> dj 100). `queue_name` is the dj
  queue and `run_after` the job's run_at.
- Results: dj deletes a job when it succeeds (DelayedJob's way), so a finished success cannot be
  told from an unknown id and `supports_get_result` is False. `get_result()` still answers while
  the job exists: READY (waiting, or waiting for a retry), RUNNING, or FAILED once it is dead, with
  its last error; after a success it raises TaskResultDoesNotExist. Return values are not kept.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import datetime
from inspect import iscoroutinefunction
from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured
from django.db import close_old_connections, connections
from django.utils import timezone
from django.utils.module_loading import import_string

import dj
from dj import admin
from dj.context import current_job
from dj.errors import DJError
from dj.task import Task as DjTask, diverted, lookup

from .compat import (BaseTaskBackend, Task, TaskContext, TaskError, TaskResult, TaskResultDoesNotExist,
                     TaskResultStatus, task_enqueued, task_finished, task_started)


def dj_priority(django_priority: int) -> int:
    """Django runs higher priorities first, dj lower ones: the same order, negated."""
    return -django_priority


class Backend(BaseTaskBackend):
    supports_defer = True
    supports_priority = True
    supports_get_result = False  # successes are deleted; see the module's docstring
    supports_async_task = True  # workers run coroutine jobs on an event loop of their own

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.database = self.options.get("DATABASE", "default")
        self.max_attempts = int(self.options.get("MAX_ATTEMPTS", 25))

    # --- defining and enqueueing --------------------------------------------------------------

    def validate_task(self, task: Task) -> None:
        super().validate_task(task)
        # Registering here, when the task is defined, is what lets a worker that imported the
        # task's module run it.
        self._register(task)

    def _register(self, task: Task) -> DjTask:
        existing = lookup(task.module_path)
        if existing is not None and getattr(existing, "django_func", None) is task.func:
            return existing
        registered = dj.job(name=task.module_path, queue=task.queue_name, max_attempts=self.max_attempts)(
            _runner(task, self))
        registered.django_func = task.func  # type: ignore[attr-defined]
        return registered

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        job_id = self._register(task).using(
            # In dj's test mode nothing is written, so Django need not connect either.
            conn=None if diverted() else self._connection(), queue=task.queue_name, priority=dj_priority(task.priority),
            run_at=task.run_after, max_attempts=self.max_attempts,
        ).enqueue(*args, **kwargs)
        result = _result(task, self.alias, str(job_id), TaskResultStatus.READY, list(args), dict(kwargs),
                         enqueued_at=timezone.now())
        task_enqueued.send(type(self), task_result=result)
        return result

    def _connection(self) -> psycopg.Connection:
        """Django's own psycopg connection, in whatever transaction Django has open on it."""
        connection = connections[self.database]
        if connection.vendor != "postgresql":
            raise ImproperlyConfigured(f"dj's task backend needs PostgreSQL; DATABASES[{self.database!r}] "
                                       f"is {connection.vendor}")
        connection.ensure_connection()
        raw = connection.connection
        if not isinstance(raw, psycopg.Connection):
            raise ImproperlyConfigured("dj's task backend needs Django's PostgreSQL backend on psycopg 3 "
                                       "(pip install 'psycopg[binary]'); this connection is "
                                       f"{type(raw).__module__}")
        return raw

    # --- results ------------------------------------------------------------------------------

    def get_result(self, result_id: str) -> TaskResult:
        try:
            job_id = int(result_id)
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        try:
            row = admin.get_job(self._connection(), job_id)
        except DJError:
            raise TaskResultDoesNotExist(f"{result_id}: no such job; dj deletes a job when it succeeds, so a "
                                         "finished success is not kept") from None
        try:
            task = import_string(row["task"])
        except ImportError:
            raise TaskResultDoesNotExist(f"{result_id} is dj job {row['task']!r}, not a Django task") from None
        if not isinstance(task, Task):
            raise TaskResultDoesNotExist(f"{result_id} is dj job {row['task']!r}, not a Django task")
        status = {"ready": TaskResultStatus.READY, "scheduled": TaskResultStatus.READY,
                  "running": TaskResultStatus.RUNNING, "dead": TaskResultStatus.FAILED}[row["state"]]
        errors = [TaskError(exception_class_path=_exception_path(row["last_error"]), traceback=row["last_error"])] \
            if row["last_error"] else []
        return _result(task, self.alias, result_id, status, _json(row["args"]), _json(row["kwargs"]),
                       enqueued_at=row["created_at"],
                       last_attempted_at=row["locked_at"] if row["attempts"] else None,
                       started_at=row["locked_at"], finished_at=row["failed_at"], errors=errors,
                       attempts=row["attempts"], worker=row["locked_by"])


def _result(task: Task, backend: str, result_id: str, status: Any, args: list[Any], kwargs: dict[str, Any], *,
            enqueued_at: datetime | None = None, started_at: datetime | None = None,
            finished_at: datetime | None = None, last_attempted_at: datetime | None = None,
            errors: list[Any] | None = None, attempts: int = 0, worker: str | None = None) -> TaskResult:
    # The framework counts attempts as len(worker_ids); dj knows the count, and only the name of
    # the worker that holds the job now.
    return TaskResult(task=task, id=result_id, status=status, enqueued_at=enqueued_at, started_at=started_at,
                      finished_at=finished_at, last_attempted_at=last_attempted_at, args=args, kwargs=kwargs,
                      backend=backend, errors=errors or [], worker_ids=[worker or "dj"] * attempts)


def _json(value: Any) -> Any:
    # Django registers its own jsonb loader (text) on its connections; dj's gives Python values.
    return json.loads(value) if isinstance(value, str) else value


def _exception_path(traceback_text: str) -> str:
    """`module.Class` of the exception a formatted traceback ends with (builtins are unqualified)."""
    lines = [line for line in traceback_text.strip().splitlines() if line and not line.startswith(" ")]
    name = lines[-1].split(":", 1)[0].strip() if lines else "Exception"
    return name if "." in name else f"builtins.{name}"


def _runner(task: Task, backend: Backend) -> Callable[..., Any]:
    """The dj job function for a Django task: runs it as Django's request cycle would, closing
    connections that went stale or broken before and after, with the framework's signals and, if
    asked for, its context."""
    func, takes_context = task.func, task.takes_context

    def started() -> TaskResult:
        ctx = current_job()
        result = _result(task, backend.alias, str(ctx.id) if ctx else "", TaskResultStatus.RUNNING, [], {},
                         started_at=timezone.now(), attempts=ctx.attempt if ctx else 1,
                         worker=ctx.worker if ctx else None)
        object.__setattr__(result, "last_attempted_at", result.started_at)
        task_started.send(type(backend), task_result=result)
        return result

    def finished(result: TaskResult, error: BaseException | None) -> None:
        if error is not None:
            result.errors.append(TaskError(
                exception_class_path=f"{type(error).__module__}.{type(error).__qualname__}",
                traceback="".join(traceback.format_exception(type(error), error, error.__traceback__))))
        object.__setattr__(result, "finished_at", timezone.now())
        object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL if error is None else TaskResultStatus.FAILED)
        task_finished.send(type(backend), task_result=result)

    if iscoroutinefunction(func):
        from asgiref.sync import sync_to_async

        async def run_async(*args: Any, **kwargs: Any) -> Any:
            await sync_to_async(close_old_connections)()
            result = await sync_to_async(started)()
            try:
                value = await (func(TaskContext(task_result=result), *args, **kwargs) if takes_context
                               else func(*args, **kwargs))
            except BaseException as exc:
                finished(result, exc)
                raise
            finally:
                await sync_to_async(close_old_connections)()
            finished(result, None)
            return value

        return run_async

    def run(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        result = started()
        try:
            value = func(TaskContext(task_result=result), *args, **kwargs) if takes_context else func(*args, **kwargs)
        except BaseException as exc:
            finished(result, exc)
            raise
        finally:
            close_old_connections()
        finished(result, None)
        return value

    run.__qualname__ = run.__name__ = f"django_task_{func.__name__}"
    return run
