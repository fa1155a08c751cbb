"""`@job`: the task registry and enqueueing.

A worker runs a job only by looking its name up in this registry, which `@job` fills as modules
are imported. Nothing in the database can name code that is not registered here.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg

from . import config, db, sql
from .errors import DJError

_registry: dict[str, "Task"] = {}

PRIORITY_MIN, PRIORITY_MAX = -32768, 32767


def lookup(name: str) -> "Task | None":
    return _registry.get(name)


def registered() -> dict[str, "Task"]:
    return dict(_registry)


def load_task_modules() -> None:
    """Import the workload in `tasks/` and every module named in DJ_TASKS, so their jobs register."""
    for module in ["tasks", *config.task_modules()]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DJError(f"cannot import task module {module!r} (from DJ_TASKS): {exc}") from exc


def to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job {what} must be JSON-serialisable: {exc}") from None


@dataclass(frozen=True)
class Options:
    queue: str = "default"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 25
    timeout: float | None = None
    conn: psycopg.Connection | None = None


class Enqueuer:
    """A task with enqueue options bound; what `Task.using(...)` returns."""

    def __init__(self, name: str, options: Options):
        self.name = name
        self.options = options

    def using(self, **changes: Any) -> "Enqueuer":
        unknown = set(changes) - set(Options.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown enqueue option(s): {', '.join(sorted(unknown))}")
        return Enqueuer(self.name, replace(self.options, **changes))

    def enqueue(self, *args: Any, **kwargs: Any) -> int:
        o = self.options
        _check_priority(o.priority)
        params = (o.queue, o.priority, self.name, to_json(list(args), "args"), to_json(kwargs, "kwargs"),
                  o.run_at, o.max_attempts, o.timeout)
        with _transaction(o.conn) as conn:
            with conn.pipeline():
                cur = conn.execute(sql.ENQUEUE, params)
                conn.execute(sql.NOTIFY, (o.queue,))
            return cur.fetchone()[0]

    def enqueue_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[int]:
        """Enqueue one job per item, in one round trip. An item is an args tuple or a kwargs dict."""
        o = self.options
        _check_priority(o.priority)
        args_json, kwargs_json = [], []
        for call in calls:
            if isinstance(call, dict):
                args_json.append("[]")
                kwargs_json.append(to_json(call, "kwargs"))
            else:
                args_json.append(to_json(list(call), "args"))
                kwargs_json.append("{}")
        n = len(args_json)
        if n == 0:
            return []
        params = ([o.queue] * n, [o.priority] * n, [self.name] * n, args_json, kwargs_json,
                  [o.run_at] * n, [o.max_attempts] * n, [o.timeout] * n)
        with _transaction(o.conn) as conn:
            with conn.pipeline():
                cur = conn.execute(sql.ENQUEUE_MANY, params)
                conn.execute(sql.NOTIFY, (o.queue,))
            return sorted(row[0] for row in cur.fetchall())


class Task(Enqueuer):
    """A registered job function. Calling it runs the function directly, in this process."""

    def __init__(self, fn: Callable[..., Any], name: str, options: Options):
        super().__init__(name, options)
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<dj task {self.name} queue={self.options.queue} priority={self.options.priority}>"


def job(name: str | None = None, *, queue: str = "default", priority: int = 0, max_attempts: int = 25,
        timeout: float | None = None) -> Callable[[Callable[..., Any]], Task]:
    """Register a function as a job. `name` defaults to `module.function`."""
    if callable(name):  # used bare, as @job
        return job()(name)
    _check_priority(priority)
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")

    def register(fn: Callable[..., Any]) -> Task:
        task_name = name or f"{fn.__module__}.{fn.__qualname__}"
        existing = _registry.get(task_name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"job name {task_name!r} is already registered by {existing.fn!r}")
        task = Task(fn, task_name, Options(queue=queue, priority=priority, max_attempts=max_attempts,
                                            timeout=timeout))
        _registry[task_name] = task
        return task

    return register


def enqueue(name: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any) -> int:
    """Enqueue a registered task by name, with the task's defaults unless `options` override them."""
    task = lookup(name)
    if task is None:
        raise DJError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_registry)) or 'none'}")
    return task.using(**options).enqueue(*args, **(kwargs or {}))


def _check_priority(priority: int) -> None:
    if not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be an integer in [{PRIORITY_MIN}, {PRIORITY_MAX}]")


class _transaction:
    """The caller's connection as it is (their transaction decides), or a pooled one that commits."""

    def __init__(self, conn: psycopg.Connection | None):
        self._conn = conn
        self._pooled = None

    def __enter__(self) -> psycopg.Connection:
        if self._conn is not None:
            return self._conn
        self._pooled = db.pool().connection()
        return self._pooled.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._pooled is not None:
            self._pooled.__exit__(*exc)
