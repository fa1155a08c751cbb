"""`@job`: the task registry and enqueueing.

A worker runs a job only by looking its name up in this registry, which `@job` fills as modules
are imported. Nothing in the database can name code that is not registered here.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg

from . import config, db, sql
from .batches import current_batch
from .errors import DJError

_registry: dict[str, "Task"] = {}

PRIORITY_MIN, PRIORITY_MAX = -32768, 32767
# From this many rows (without unique keys) enqueue_many uses COPY instead of one INSERT.
COPY_AT = 1000


# The test mode's seam (dj/testing.py): while set, every enqueue path, sync or async, hands its
# calls here instead of writing to a database, and returns what this returns as the job ids.
Interceptor = Callable[["Enqueuer", list[tuple[Sequence[Any], dict[str, Any]]]], list[int]]
_interceptor: Interceptor | None = None


def lookup(name: str) -> "Task | None":
    return _registry.get(name)


def registered() -> dict[str, "Task"]:
    return dict(_registry)


def load_task_modules() -> None:
    """Import the workload in `tasks/` and every module named in DJ_TASKS, so their jobs register;
    in a Django project (DJANGO_SETTINGS_MODULE), set Django up and import its apps' tasks too."""
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        from .contrib.django import setup

        setup()
    for module in ["tasks", *config.task_modules()]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise DJError(f"cannot import task module {module!r} (from DJ_TASKS): {exc}") from exc


# Arguments travel in every claim and sit in the hot table: pass references (ids, paths), not data.
MAX_ARGS_BYTES = 1_000_000


def _check_size(args_json: str, kwargs_json: str) -> None:
    size = len(args_json) + len(kwargs_json)  # json.dumps escapes to ASCII: characters are bytes
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"job arguments are {size / 1e6:.1f} MB of JSON; the limit is "
                         f"{MAX_ARGS_BYTES / 1e6:g} MB: pass a reference (an id, a path) instead")


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def to_json(value: Any, what: str) -> str:
    if not value and isinstance(value, (list, tuple, dict)):
        return "{}" if isinstance(value, dict) else "[]"
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job {what} must be JSON-serialisable: {exc}") from None


def _arguments_json(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, str]:
    """A job's args and kwargs as JSON, within the size limit."""
    args_json, kwargs_json = to_json(args, "args"), to_json(kwargs, "kwargs")
    _check_size(args_json, kwargs_json)
    return args_json, kwargs_json


@dataclass(frozen=True)
class Options:
    queue: str = "default"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 25
    timeout: float | None = None
    conn: psycopg.Connection | None = None
    # A job whose key is held by a ready, scheduled or running job is not inserted again.
    unique_key: str | None = None
    # How @job(unique=...) derives a key from the arguments: True (all of them) or a function.
    unique: bool | Callable[..., Any] | None = None


def _key_from_args(options: Options, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    if options.unique_key is not None:
        key = options.unique_key
    elif options.unique is True:
        key = to_json([list(args), kwargs], "args")
    elif callable(options.unique):
        key = str(options.unique(*args, **kwargs))
    else:
        return None
    return f"{name}:{key}"


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
        """Insert one job and return its id; if its unique key is held, the holder's id."""
        o = self.options
        if _interceptor is not None:
            return _interceptor(self, [(args, kwargs)])[0]
        if o.unique_key is not None or o.unique:
            return self._enqueue([(args, kwargs)])[0]
        # The common case, kept short because a web request pays for it: one INSERT that cannot
        # conflict, so none of the holder look-up that unique keys need.
        _check_priority(o.priority)
        args_json, kwargs_json = _arguments_json(args, kwargs)
        batch = current_batch()
        with db.borrow(o.conn) as conn:
            job_id = conn.execute(sql.ENQUEUE_ONE, self._row(args_json, kwargs_json, None, batch.id if batch else None)).fetchone()[0]
        if batch:
            batch.total += 1
        return job_id

    def enqueue_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[int]:
        """Enqueue one job per item, in one round trip. An item is an args tuple or a kwargs dict."""
        if self.options.unique_key is not None:
            raise TypeError("unique_key names one job; for many, use @job(unique=...)")
        return self._enqueue([((), call) if isinstance(call, dict) else (tuple(call), {}) for call in calls])

    def _enqueue(self, calls: list[tuple[Sequence[Any], dict[str, Any]]]) -> list[int]:
        if _interceptor is not None:
            return _interceptor(self, calls)
        o = self.options
        _check_priority(o.priority)
        rows = [(*_arguments_json(args, kwargs), _key_from_args(o, self.name, args, kwargs)) for args, kwargs in calls]
        if not rows:
            return []
        batch = current_batch()
        ids: dict[int, int] = {}
        pending = list(range(len(rows)))
        with db.borrow(o.conn) as conn:
            # A key's holder can finish between our INSERT and the look-up of its id; then the key
            # is free, and the next round inserts the job after all.
            while pending:
                inserted = self._insert(conn, [rows[i] for i in pending], batch.id if batch else None)
                if batch:
                    batch.total += sum(1 for job_id in inserted if job_id is not None)
                held = {}
                for i, job_id in zip(pending, inserted):
                    if job_id is None:
                        held[rows[i][2]] = i
                    else:
                        ids[i] = job_id
                holders = dict(conn.execute(sql.HOLDERS_OF_KEYS, (list(held),)).fetchall()) if held else {}
                for key, i in held.items():
                    if key in holders:
                        ids[i] = holders[key]
                pending = [i for key, i in held.items() if key not in holders]
        return [ids[i] for i in range(len(rows))]

    def _row(self, args_json: str, kwargs_json: str, key: str | None, batch_id: int | None) -> dict[str, Any]:
        """The parameters of ENQUEUE_ONE and ENQUEUE_ONE_UNIQUE."""
        o = self.options
        return {"queue": o.queue, "priority": o.priority, "task": self.name, "args": args_json, "kwargs": kwargs_json,
                "run_at": o.run_at, "max_attempts": o.max_attempts, "timeout": o.timeout, "unique_key": key,
                "batch_id": batch_id}

    def _insert(self, conn: psycopg.Connection, rows: list[tuple[str, str, str | None]],
                batch_id: int | None) -> list[int | None]:
        """Insert rows (and NOTIFY) with one statement. Returns each row's new id, or None where its
        unique key was held."""
        o = self.options
        if len(rows) >= COPY_AT and all(key is None for _, _, key in rows):
            return self._copy(conn, rows, batch_id)
        if len(rows) == 1:
            statement = sql.ENQUEUE_ONE if rows[0][2] is None else sql.ENQUEUE_ONE_UNIQUE
            inserted = conn.execute(statement, self._row(*rows[0], batch_id)).fetchone()
            return [inserted[0] if inserted else None]
        params = {"queue": o.queue, "priority": o.priority, "task": self.name, "run_at": o.run_at,
                  "max_attempts": o.max_attempts, "timeout": o.timeout, "batch_id": batch_id,
                  "args": [r[0] for r in rows], "kwargs": [r[1] for r in rows], "keys": [r[2] for r in rows]}
        cur = conn.execute(sql.ENQUEUE, params)
        # Identity values are drawn in input order, so the inserted rows, sorted by id, line up
        # with the input rows that were not skipped.
        returned = iter(sorted((job_id, key) for job_id, key, _ in cur.fetchall()))
        nxt = next(returned, None)
        result: list[int | None] = []
        for _, _, key in rows:
            if nxt is not None and nxt[1] == key:
                result.append(nxt[0])
                nxt = next(returned, None)
            else:
                result.append(None)
        return result


    def _copy(self, conn: psycopg.Connection, rows: list[tuple[str, str, str | None]],
              batch_id: int | None) -> list[int]:
        """Bulk path: draw the ids first, then COPY the rows in, then one NOTIFY.

        COPY cannot return ids, so they come from the table's sequence beforehand. Columns left at
        their defaults (run_at = now(), no timeout, no batch) are left out of the COPY."""
        o = self.options
        # On dj's own (autocommit) connection the COPY gets a transaction of its own; a caller's
        # connection is left to the caller's transaction, as with every enqueue.
        with conn.transaction() if conn.autocommit else nullcontext():
            ids = [r[0] for r in conn.execute(sql.DRAW_JOB_IDS, (len(rows),)).fetchall()]
            fixed = {"queue": o.queue, "priority": o.priority, "task": self.name, "max_attempts": o.max_attempts,
                     "run_at": o.run_at, "timeout": o.timeout, "batch_id": batch_id}
            fixed = {k: v for k, v in fixed.items() if v is not None}
            columns = ", ".join(["id", "args", "kwargs", *fixed])
            tail = tuple(fixed.values())
            with conn.cursor().copy(f"COPY jobs ({columns}) FROM STDIN") as copy:
                for job_id, (args, kwargs, _) in zip(ids, rows):
                    copy.write_row((job_id, args, kwargs, *tail))
            conn.execute(sql.NOTIFY, (o.queue,))
        return ids


class Task(Enqueuer):
    """A registered job function. Calling it runs the function directly, in this process."""

    def __init__(self, fn: Callable[..., Any], name: str, options: Options, cron: str | None = None):
        super().__init__(name, options)
        self.fn = fn
        self.cron = cron  # a cron expression: workers enqueue the task at each tick (see dj/cron.py)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<dj task {self.name} queue={self.options.queue} priority={self.options.priority}>"


def job(name: str | None = None, *, queue: str = "default", priority: int = 0, max_attempts: int = 25,
        timeout: float | None = None, unique: bool | Callable[..., Any] | None = None,
        cron: str | None = None,
        ) -> Callable[[Callable[..., Any]], Task]:
    """Register a function as a job. `name` defaults to `module.function`.

    `unique=True` makes jobs with equal arguments unique while one is pending; `unique=fn` uses
    `fn(*args, **kwargs)` as the key.
    `cron="*/5 * * * *"` makes running workers enqueue it, without arguments, once per tick (dj/cron.py).
    """
    if callable(name):  # used bare, as @job
        return job()(name)
    _check_priority(priority)
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if cron is not None:
        from .cron import validate

        validate(cron)  # ValueError for an expression croniter rejects or that never fires

    def register(fn: Callable[..., Any]) -> Task:
        task_name = name or f"{fn.__module__}.{fn.__qualname__}"
        existing = _registry.get(task_name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"job name {task_name!r} is already registered by {existing.fn!r}")
        task = Task(fn, task_name, Options(queue=queue, priority=priority, max_attempts=max_attempts,
                                            timeout=timeout, unique=unique), cron=cron)
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
