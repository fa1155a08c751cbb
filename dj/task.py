"""`@job`: the task registry and enqueueing.

A worker runs a job only by looking its name up in this registry, which `@job` fills as modules
are imported. Nothing in the database can name code that is not registered here.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from . import config, connections, db, enqueueing, sql
from .batches import Batch, current_batch
from .dependencies import After, BatchRef, split
from .enqueueing import COPY_AT, MAX_ARGS_BYTES, Call, Plan, arguments_json, row_params, to_json
from .errors import DJError
from .rates import Rate
from .rates import parse as parse_rate
from .tracing import enqueuing

if TYPE_CHECKING:
    from typing_extensions import TypedDict, Unpack

    from .connections import Conn

    class EnqueueOptions(TypedDict, total=False):
        """What using() takes: each overrides the task's default for the jobs enqueued through it."""
        queue: str
        priority: int
        run_at: datetime | None
        max_attempts: int
        timeout: float | None
        conn: Conn | None
        unique_key: str | None
        unique: bool | Callable[..., Any] | None
        keep: float | timedelta | None
        after: Iterable[int | Batch | BatchRef]

__all__ = ["COPY_AT", "MAX_ARGS_BYTES", "Enqueuer", "Options", "Task", "enqueue", "job", "lookup", "registered",
           "to_json"]

P = ParamSpec("P")
R = TypeVar("R")

_registry: dict[str, Task[..., Any]] = {}

PRIORITY_MIN, PRIORITY_MAX = -32768, 32767


# The test mode's seam (dj/testing/): while set, every enqueue path, sync or async, hands its
# calls here instead of writing to a database, and returns what this returns as the job ids.
Interceptor = Callable[["Enqueuer[Any, Any]", list[Call]], list[int]]
_interceptor: Interceptor | None = None


def _intercepted(enqueuer: Enqueuer[Any, Any], calls: list[Call], want_async: bool) -> list[int]:
    """The test mode's answer, after the check production makes of `conn=` before it writes: an
    async connection given to a sync enqueue (or the reverse) is a TypeError there too."""
    assert _interceptor is not None
    if enqueuer.options.conn is not None:
        connections.check_kind(enqueuer.options.conn, want_async)
    return _interceptor(enqueuer, calls)


def diverted() -> bool:
    """Whether the test mode (dj.testing) is diverting enqueues: then nothing touches a database."""
    return _interceptor is not None


def lookup(name: str) -> Task[..., Any] | None:
    return _registry.get(name)


def registered() -> dict[str, Task[..., Any]]:
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


@dataclass(frozen=True)
class Options:
    queue: str = "default"
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 25
    timeout: float | None = None
    # The caller's connection, whose transaction the jobs join (dj/connections.py says what it takes).
    conn: Conn | None = None
    # A job whose key is held by a ready, scheduled or running job is not inserted again.
    unique_key: str | None = None
    # How @job(unique=...) derives a key from the arguments: True (all of them) or a function.
    unique: bool | Callable[..., Any] | None = None
    # Seconds a success is kept, with its return value (dj.result); None: deleted, as in DelayedJob.
    keep: float | None = None
    # A per-key limit: at most `limit` jobs whose `limit_by(*args, **kwargs)` is equal run at once.
    limit_by: Callable[..., Any] | None = None
    limit: int | None = None

    # Job ids and batch ids the jobs wait for (dj/dependencies.py): using(after=[...]) fills it.
    after: After | None = None


def keep_seconds(keep: float | timedelta | None) -> float | None:
    """`keep=` as seconds: a positive number of seconds or a timedelta, or None (not kept)."""
    if keep is None:
        return None
    if isinstance(keep, timedelta):
        keep = keep.total_seconds()
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep < float("inf"):
        raise ValueError(f"keep must be a positive number of seconds or a timedelta, not {keep!r}")
    return float(keep)


def _check_after(options: Options) -> None:
    if options.after and options.run_at is not None:
        raise ValueError("run_at cannot be combined with after=: a dependent runs as soon as the "
                         "jobs it waits for have succeeded")


def _check_limit(limit_by: Callable[..., Any] | None, limit: int | None) -> None:
    if limit is not None and limit_by is None:
        raise ValueError("limit needs limit_by: the function that maps a job's arguments to its key")
    if limit_by is not None and not callable(limit_by):
        raise TypeError("limit_by must be a function of the job's arguments")
    if limit_by is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError("limit must be an integer of at least 1")


class Enqueuer(Generic[P, R]):
    """A task with enqueue options bound; what `Task.using(...)` returns. Its enqueue methods take
    the task function's arguments (type checkers hold them to its signature)."""

    def __init__(self, name: str, options: Options):
        self.name = name
        self.options = options

    def using(self, **changes: Unpack[EnqueueOptions]) -> Enqueuer[P, R]:
        unknown = set(changes) - set(Options.__dataclass_fields__)
        if {"limit_by", "limit"} & set(changes):
            # Workers claim keyed jobs only for the tasks they know to have a limit (dj/worker/producer.py).
            raise TypeError("limit_by and limit belong to the task: set them on @job")
        if unknown:
            raise TypeError(f"unknown enqueue option(s): {', '.join(sorted(unknown))}")
        conn = changes.get("conn")
        if conn is not None:
            connections.is_async(conn)  # a TypeError here, for anything it cannot be
        options: dict[str, Any] = dict(changes)
        if "after" in options and options["after"] is not None:  # None: waits for nothing, as leaving it out
            after = split(options["after"])
            options["after"] = after if after[0] or after[1] else None
        if "keep" in options:
            options["keep"] = keep_seconds(options["keep"])
        return Enqueuer(self.name, replace(self.options, **options))

    @enqueuing  # a `dj enqueue` span, with the extra dj[otel] (dj/tracing.py)
    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> int:
        """Insert one job and return its id; if its unique key is held, the holder's id."""
        o = self.options
        if _interceptor is not None:
            return _intercepted(self, [(args, kwargs)], False)[0]
        if o.unique_key is not None or o.unique or o.after or o.limit_by is not None:
            return self._enqueue([(args, kwargs)])[0]
        # The common case, kept short because a web request pays for it: one INSERT that cannot
        # conflict, so none of the holder look-up that unique keys need.
        params, batch = self._one(args, kwargs)
        with db.borrow(o.conn) as conn:
            job_id: int = db.single_cursor(conn).execute(sql.ENQUEUE_ONE, params).fetchone()[0]  # type: ignore[index]
        if batch:
            batch.total += 1
        return job_id

    @enqueuing
    async def enqueue_async(self, *args: P.args, **kwargs: P.kwargs) -> int:
        """enqueue(), from async code: on this event loop's pool, or in the transaction of an
        async `conn=` (a psycopg AsyncConnection, a SQLAlchemy AsyncSession or AsyncConnection)."""
        o = self.options
        if _interceptor is not None:
            return _intercepted(self, [(args, kwargs)], True)[0]
        if o.unique_key is not None or o.unique or o.after or o.limit_by is not None:
            return (await self._enqueue_async([(args, kwargs)]))[0]
        params, batch = self._one(args, kwargs)
        # Written out rather than through db.borrow_async(): its context manager costs about 1.5 us
        # of Python a call, 1-2% of the rate next to a bare INSERT (dj bench, async-single).
        if o.conn is not None:
            conn = await connections.async_connection(o.conn)
            job_id: int = (await (await conn.execute(sql.ENQUEUE_ONE, params)).fetchone())[0]  # type: ignore[index]
        else:
            pool = db.loop_async_pool() or await db.async_pool()
            conn = await pool.getconn()
            try:
                # The pooled connection's kept cursor (see db.PooledConnection).
                cur = conn.enqueue_cursor()
                job_id = (await (await cur.execute(sql.ENQUEUE_ONE, params)).fetchone())[0]  # type: ignore[index]
            finally:
                await pool.putconn(conn)
        if batch:
            batch.total += 1
        return job_id

    @enqueuing
    def enqueue_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[int]:
        """Enqueue one job per item, in one round trip. An item is an args tuple or a kwargs dict."""
        return self._enqueue(self._calls(calls))

    @enqueuing
    async def enqueue_many_async(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[int]:
        """enqueue_many(), from async code (see enqueue_async())."""
        return await self._enqueue_async(self._calls(calls))

    def _calls(self, calls: Iterable[Sequence[Any] | dict[str, Any]]) -> list[Call]:
        if self.options.unique_key is not None:
            raise TypeError("unique_key names one job; for many, use @job(unique=...)")
        return [((), call) if isinstance(call, dict) else (tuple(call), {}) for call in calls]

    def _one(self, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], Batch | None]:
        """ENQUEUE_ONE's parameters for one job without a unique key, and the batch it joins."""
        o = self.options
        _check_priority(o.priority)
        args_json, kwargs_json = arguments_json(args, kwargs)
        batch = current_batch()
        return row_params(self.name, o, args_json, kwargs_json, None, batch.id if batch else None), batch

    def _plan(self, calls: list[Call]) -> Plan | None:
        _check_priority(self.options.priority)
        _check_after(self.options)
        plan = Plan(self.name, self.options, calls)
        return plan if plan.rows else None

    def _enqueue(self, calls: list[Call]) -> list[int]:
        if _interceptor is not None:
            return _intercepted(self, calls, False)
        plan = self._plan(calls)
        if plan is None:
            return []
        with db.borrow(self.options.conn) as conn:
            return enqueueing.run(conn, plan)

    async def _enqueue_async(self, calls: list[Call]) -> list[int]:
        if _interceptor is not None:
            return _intercepted(self, calls, True)
        plan = self._plan(calls)
        if plan is None:
            return []
        async with db.borrow_async(self.options.conn) as conn:
            return await enqueueing.run_async(conn, plan)


class Task(Enqueuer[P, R]):
    """A registered job function. Calling it runs the function directly, in this process."""

    def __init__(self, fn: Callable[P, R], name: str, options: Options, cron: str | None = None,
                 rate: Rate | None = None):
        super().__init__(name, options)
        self.rate = rate  # @job(rate=...): at most rate.limit claims per rate.period, all hosts (dj/rates.py)
        self.fn = fn
        # A coroutine function: workers run it on their event loop (dj/worker/executor.py), and
        # calling the task returns the coroutine, as calling the function would.
        self.is_async = inspect.iscoroutinefunction(fn)
        self.cron = cron  # a cron expression: workers enqueue the task at each tick (see dj/cron.py)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<dj task {self.name} queue={self.options.queue} priority={self.options.priority}>"


@overload
def job(name: Callable[P, R], /) -> Task[P, R]: ...


@overload
def job(name: str | None = None, *, queue: str = "default", priority: int = 0, max_attempts: int = 25,
        timeout: float | None = None, unique: bool | Callable[..., Any] | None = None,
        cron: str | None = None, limit_by: Callable[..., Any] | None = None,
        limit: int | None = None, rate: str | None = None,
        keep: float | timedelta | None = None) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def job(name: str | Callable[P, R] | None = None, *, queue: str = "default", priority: int = 0,
        max_attempts: int = 25, timeout: float | None = None, unique: bool | Callable[..., Any] | None = None,
        cron: str | None = None, limit_by: Callable[..., Any] | None = None, limit: int | None = None,
        rate: str | None = None, keep: float | timedelta | None = None,
        ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Register a function as a job. `name` defaults to `module.function`.

    `unique=True` makes jobs with equal arguments unique while one is pending; `unique=fn` uses
    `fn(*args, **kwargs)` as the key.
    `cron="*/5 * * * *"` makes running workers enqueue it, without arguments, once per tick (dj/cron.py).
    `limit_by=fn, limit=N`: at most N jobs of this task with equal `str(fn(*args, **kwargs))` run at
    once, over all workers and hosts (N defaults to 1: one at a time per key, in order). See the
    README, "Limits per key".
    `rate="10/s"` (or N/min, N/h): at most that many of its jobs start in any such window, across
    all workers and hosts (dj/rates.py).
    `keep=3600` (seconds, or a timedelta) keeps a success that long, with its return value, for
    `dj.result()` and the history (dj/results.py); by default a success is deleted.
    """
    if callable(name):  # used bare, as @job
        return job()(name)
    _check_priority(priority)
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if limit_by is not None and limit is None:
        limit = 1
    _check_limit(limit_by, limit)
    keep_s = keep_seconds(keep)
    if cron is not None:
        from .cron import validate

        validate(cron)  # ValueError for an expression croniter rejects or that never fires
    task_rate = None if rate is None else parse_rate(rate)  # ValueError for a bad spec

    def register(fn: Callable[P, R]) -> Task[P, R]:
        task_name = name or f"{fn.__module__}.{fn.__qualname__}"
        existing = _registry.get(task_name)
        if existing is not None and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"job name {task_name!r} is already registered by {existing.fn!r}")
        task: Task[P, R] = Task(fn, task_name, Options(queue=queue, priority=priority, max_attempts=max_attempts,
                                            timeout=timeout, unique=unique, limit_by=limit_by, limit=limit,
                                            keep=keep_s),
                                  cron=cron, rate=task_rate)
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
