"""The capture: dj.task's `_interceptor` and dj.batches' `_recorder` while it is active, and the
jobs it runs (see dj/testing/__init__.py)."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import batches, connections, enqueueing, task as _task
from ..dependencies import UnknownDependency
from ..context import JobContext, _set_current
from ..errors import DJError, JobDead, ResultError, ResultNotKept
from .records import ANY, CapturedJob, assert_matches, aware, matching, positive, task_name, utcnow


@dataclass(frozen=True)
class _TestJobContext(JobContext):
    """`dj.current_job()` inside a job run by the test mode: progress is recorded on the job."""

    record: CapturedJob | None = field(default=None, repr=False, compare=False)

    def progress(self, fraction: float, message: str = "") -> None:
        if self.record is not None:
            self.record.progress.append((float(fraction), message))


@dataclass
class _Batch:
    on_complete: str | None
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    total: int = 0
    succeeded: int = 0
    dead: int = 0
    closed: bool = False
    finished: bool = False


class Jobs:
    """What `capture()` and `inline()` return, and what the pytest fixture `dj_jobs` is.

    `jobs` holds the jobs not run yet, in the order they were enqueued; `performed` those that ran
    and returned; `failed` those that raised (each with its `error`). A drained job that raises is
    not retried: it counts as dead for its batch, and its exception propagates. A job enqueued with
    after= runs once what it waits for has run and returned, and lands in `failed` (never run) when
    one of those raised; one still waiting when drain() ends stays in `jobs`.
    """

    def __init__(self, run_at_once: bool = False):
        self.jobs: list[CapturedJob] = []
        self.performed: list[CapturedJob] = []
        self.failed: list[CapturedJob] = []
        self._running_ids: set[int] = set()
        self._inline = run_at_once
        self._lock = threading.RLock()  # enqueues may come from any thread
        self._last_id = 0  # jobs and batches draw their ids from this one counter (see _new_id)
        self._held: dict[str, CapturedJob] = {}  # unique key -> the pending or running job holding it
        self._batches: dict[int, _Batch] = {}
        self.batch_results: dict[int, Any] = {}  # what dj.batches.record_result() stored, by batch id
        self._runner: Any = None  # an asyncio.Runner for coroutine jobs run from sync code
        self._saved: list[tuple[Any, Any]] = []

    # --- the seam --------------------------------------------------------------------------------

    def __enter__(self) -> "Jobs":
        self._saved.append((_task._interceptor, batches._recorder))
        _task._interceptor = self._intercept
        batches._recorder = self
        return self

    def __exit__(self, *exc: object) -> None:
        if _task._interceptor != self._intercept or batches._recorder is not self:
            raise RuntimeError("dj.testing blocks must exit in the reverse order of entry "
                               "(another capture() or inline() was entered inside this one and is still active)")
        previous_interceptor, previous_recorder = self._saved.pop()
        _task._interceptor, batches._recorder = previous_interceptor, previous_recorder
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def _intercept(self, enqueuer: _task.Enqueuer[Any, Any], calls: list[enqueueing.Call]) -> list[int]:
        o = enqueuer.options
        # The checks production makes before it writes, all of them before anything is recorded.
        _task._check_priority(o.priority)
        _task._check_after(o)
        _check_driver(o.conn)
        prepared = [(*enqueueing.arguments_json(args, kwargs),
                     enqueueing.key_from_args(o, enqueuer.name, args, kwargs)) for args, kwargs in calls]
        for args, kwargs in calls:  # a limit_by that raises for these arguments raises here too
            enqueueing.limit_key_from_args(o, enqueuer.name, args, kwargs)
        now = utcnow()
        run_at = aware(o.run_at) if o.run_at is not None else now
        batch = batches.current_batch()
        ids, new = [], []
        with self._lock:
            after = self._check_dependencies(o.after) if o.after else ((), ())
            for args_json, kwargs_json, key in prepared:
                holder = self._held.get(key) if key is not None else None
                if holder is not None:
                    ids.append(holder.id)
                    continue
                record = CapturedJob(self._new_id(), enqueuer.name, json.loads(args_json), json.loads(kwargs_json),
                                     o.queue, o.priority, run_at, now, o.max_attempts, o.timeout, key,
                                     batch.id if batch else None, keep=o.keep, after=after)
                if key is not None:
                    self._held[key] = record
                self.jobs.append(record)
                ids.append(record.id)
                new.append(record)
            if batch:
                batch.total += len(new)
        self._settle()
        if self._inline:
            # Dependencies run at their enqueue here, so a dependent is ready (or dead) at once;
            # one waiting for a batch that is still open runs at the next drain().
            for record in new:
                if record in self.jobs and self._dependency_state(record) == "ready":
                    self._run_now(record)
        return ids

    def _new_id(self) -> int:
        with self._lock:
            self._last_id += 1
            return self._last_id

    # Dependencies (after=), as production has them (dj/dependencies.py): a dependent waits while a
    # job or batch it names is unfinished, and dies, naming it, when one is dead or cancelled.

    def _check_dependencies(self, after: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        job_ids, batch_ids = after
        unknown = [f"job {j}" for j in job_ids if not 1 <= j <= self._last_id]
        unknown += [f"batch {b}" for b in batch_ids if b not in self._batches]
        if unknown:
            raise UnknownDependency(f"after= names no such {', '.join(unknown)}: it never existed")
        return after

    def _dependency_state(self, record: CapturedJob) -> str:
        """'ready', 'waiting', or why it must die."""
        job_ids, batch_ids = record.after
        waiting = False
        for j in job_ids:
            if any(r.id == j for r in self.failed):
                return f"dependency job {j} is dead"
            # Neither pending nor running: it succeeded (or was cleared).
            waiting = waiting or j in self._running_ids or any(r.id == j for r in self.jobs)
        for b in batch_ids:
            state = self._batches[b]
            if state.finished and state.dead:
                return f"dependency batch {b} finished with dead or cancelled jobs"
            waiting = waiting or not state.finished
        return "waiting" if waiting else "ready"

    def _settle(self) -> None:
        """Kill the dependents of dead jobs and batches, down the chain."""
        while True:
            with self._lock:
                doomed = [(r, why) for r in self.jobs if r.after != ((), ())
                          and (why := self._dependency_state(r)) not in ("ready", "waiting")]
                for record, _ in doomed:
                    self.jobs.remove(record)
            if not doomed:
                return
            for record, why in doomed:
                self._finished(record, DJError(why))

    # Batches (the `_recorder` seam of dj.batches): opened, closed and completed in memory.

    def open_batch(self, b: batches.Batch) -> int:
        name, args_json, kwargs_json, queue, _ = b._row
        with self._lock:
            batch_id = self._new_id()
            self._batches[batch_id] = _Batch(name, json.loads(args_json), json.loads(kwargs_json), queue)
        return batch_id

    def close_batch(self, b: batches.Batch) -> None:
        assert b.id is not None
        with self._lock:
            state = self._batches[b.id]
            state.total, state.closed = b.total, True
        self._maybe_finish_batch(b.id)

    def record_result(self, batch_id: int, result: Any) -> None:
        self.batch_results[batch_id] = json.loads(_task.to_json(result, "result"))

    def _maybe_finish_batch(self, batch_id: int) -> None:
        """Enqueue the callback of a closed batch whose jobs have all succeeded or died, once."""
        with self._lock:
            state = self._batches.get(batch_id)
            if state is None or not state.closed or state.finished or state.succeeded + state.dead < state.total:
                return
            state.finished = True
            if state.on_complete is None:
                return
            now = utcnow()
            summary = {"id": batch_id, "total": state.total, "succeeded": state.succeeded, "dead": state.dead}
            record = CapturedJob(self._new_id(), state.on_complete, list(state.args),
                                 {**state.kwargs, "batch": summary}, state.queue, 0, now, now)
            self.jobs.append(record)
        if self._inline:
            self._run_now(record)

    # --- looking at the jobs -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[CapturedJob]:
        return iter(list(self.jobs))

    def filter(self, task: Any = ANY, **fields: Any) -> list[CapturedJob]:
        """The jobs not run yet that match: `task` is a task or its name; any other field of
        CapturedJob is compared for equality, or passed to a function given instead of a value.
        `run_at` takes a datetime (matched within a second), a timedelta (the delay after the
        enqueue, within a second) or None (to run at once); `tolerance=` changes the second."""
        return matching(self.jobs, task, fields)

    def count(self, task: Any = ANY, **fields: Any) -> int:
        return len(self.filter(task, **fields))

    def assert_enqueued(self, task: Any = ANY, *, count: int | None = None, **fields: Any) -> CapturedJob:
        """Fail unless a job not run yet matches (exactly `count` of them, if given); returns the first."""
        return assert_matches(self.jobs, "enqueued", task, positive(count), fields)[0]

    def assert_not_enqueued(self, task: Any = ANY, **fields: Any) -> None:
        assert_matches(self.jobs, "enqueued", task, 0, fields)

    def assert_performed(self, task: Any = ANY, *, count: int | None = None, **fields: Any) -> CapturedJob:
        """Like assert_enqueued, over the jobs that ran and returned."""
        return assert_matches(self.performed, "performed", task, positive(count), fields)[0]

    def clear(self) -> None:
        """Forget every job: not run yet, performed and failed (unique keys are free again)."""
        with self._lock:
            self.jobs.clear()
            self.performed.clear()
            self.failed.clear()
            self._held.clear()

    # --- running them ------------------------------------------------------------------------------

    def drain(self, task: Any = ANY, *, queue: str | None = None, max_jobs: int = 100_000) -> int:
        """Run every job not run yet, scheduled ones too, in claim order (priority, run_at, id),
        along with the jobs they enqueue; returns how many ran. A job's exception propagates.
        `task=` and `queue=` run only the jobs that match."""
        ran = 0
        while (record := self._next(task, queue)) is not None:
            ran = self._count(ran, max_jobs)
            self._run_now(record)
        return ran

    async def drain_async(self, task: Any = ANY, *, queue: str | None = None, max_jobs: int = 100_000) -> int:
        """drain() for async tests: coroutine jobs are awaited on the running event loop."""
        ran = 0
        while (record := self._next(task, queue)) is not None:
            ran = self._count(ran, max_jobs)
            with self._running(record):
                result = _task.lookup(record.task).fn(*record.args, **record.kwargs)  # type: ignore[union-attr]
                if inspect.isawaitable(result):
                    result = await result
                _keep_result(record, result)
        return ran

    def _count(self, ran: int, max_jobs: int) -> int:
        if ran >= max_jobs:
            raise RuntimeError(f"drain() ran {max_jobs} jobs and more keep coming: does a job enqueue itself? "
                               "(raise max_jobs= if this many is right)")
        return ran + 1

    def _next(self, task: Any, queue: str | None) -> CapturedJob | None:
        """Take the job a worker would claim first (it stays out of `jobs` while it runs)."""
        self._settle()
        with self._lock:
            candidates = [j for j in self.jobs if (queue is None or j.queue == queue)
                          and (task is ANY or j.task == task_name(task))
                          and (j.after == ((), ()) or self._dependency_state(j) == "ready")]
            if not candidates:
                return None
            record = min(candidates, key=lambda j: (j.priority, j.run_at, j.id))
            self.jobs.remove(record)
            return record

    def _run_now(self, record: CapturedJob) -> None:
        with self._lock:
            if record in self.jobs:  # inline: enqueued a moment ago
                self.jobs.remove(record)
        with self._running(record):
            result = _task.lookup(record.task).fn(*record.args, **record.kwargs)  # type: ignore[union-attr]
            if inspect.isawaitable(result):
                result = self._await(result)
            _keep_result(record, result)

    def result(self, job_id: int) -> Any:
        """dj.result() under the test mode: the value a job that ran returned, as production would
        give it (after a round trip through JSON). Raises as production does: JobDead for a job
        that raised, ResultNotKept for one enqueued without keep=, LookupError for an unknown id;
        and TimeoutError at once for a job not run yet (call drain() first: nothing else would
        run it)."""
        with self._lock:
            performed = next((r for r in self.performed if r.id == job_id), None)
            failed = next((r for r in self.failed if r.id == job_id), None)
            pending = next((r for r in self.jobs if r.id == job_id), None)
        record = performed or failed or pending
        if record is None:
            raise LookupError(f"no job {job_id} in this capture")
        if failed is not None:
            raise JobDead(job_id, f"{type(failed.error).__name__}: {failed.error}")
        if record.keep is None:
            raise ResultNotKept(f"job {job_id} was enqueued without keep=: its result is never stored")
        if performed is not None:
            return performed.result
        raise TimeoutError(f"job {job_id} has not run: call drain() first")

    def _running(self, record: CapturedJob) -> "_Running":
        if _task.lookup(record.task) is None:  # production makes such a job dead; here the test hears of it
            error = DJError(f"unknown task {record.task!r}: no @job with this name is registered")
            self._finished(record, error)
            raise error
        return _Running(self, record)

    def _finished(self, record: CapturedJob, error: BaseException | None) -> None:
        with self._lock:
            if record.unique_key is not None and self._held.get(record.unique_key) is record:
                del self._held[record.unique_key]
            record.error = error
            (self.failed if error is not None else self.performed).append(record)
            state = self._batches.get(record.batch_id) if record.batch_id is not None else None
            if state is not None:
                if error is None:
                    state.succeeded += 1
                else:
                    state.dead += 1
        if state is not None:
            self._maybe_finish_batch(record.batch_id)  # type: ignore[arg-type]
        if self._inline:
            self._run_released()

    def _run_released(self) -> None:
        """Inline: run the dependents that a job's end has released, as a worker would be woken to."""
        self._settle()
        while (record := next((r for r in list(self.jobs) if r.after != ((), ())
                               and self._dependency_state(r) == "ready"), None)) is not None:
            self._run_now(record)

    def _await(self, awaitable: Any) -> Any:
        """Run a coroutine job to its end from sync code, on an event loop of this capture's."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if sys.version_info >= (3, 11):
                if self._runner is None:
                    self._runner = asyncio.Runner()  # one loop for the capture, as a worker has one
                return self._runner.run(_wrap(awaitable), context=contextvars.copy_context())
            return asyncio.run(_wrap(awaitable))
        # A loop is running in this thread (an inline enqueue from async code, or drain() called
        # from a coroutine): it cannot be re-entered, so the job runs on a loop of its own, in a
        # thread, while this one waits. Prefer `await jobs.drain_async()` in async tests.
        outcome: dict[str, Any] = {}
        context = contextvars.copy_context()

        def run() -> None:
            try:
                outcome["value"] = context.run(asyncio.run, _wrap(awaitable))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                outcome["error"] = exc

        thread = threading.Thread(target=run, name="dj.testing")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")


class _Running:
    """While a job runs: `dj.current_job()` describes it, it is in no batch of the caller's, and
    its unique key stays held; afterwards it is performed or failed."""

    def __init__(self, jobs: Jobs, record: CapturedJob):
        self.jobs, self.record = jobs, record

    def __enter__(self) -> None:
        r = self.record
        self.jobs._running_ids.add(r.id)
        self.tokens = (_set_current(_TestJobContext(id=r.id, task=r.task, queue=r.queue, attempt=1,
                                                    worker="dj.testing", record=r)),
                       batches._current.set(None))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        job_token, batch_token = self.tokens
        batches._current.reset(batch_token)
        _set_current(None, job_token)
        self.jobs._running_ids.discard(self.record.id)
        self.jobs._finished(self.record, exc)


def active() -> Jobs | None:
    """The innermost active capture() or inline() block, if any (dj.result() reads from it)."""
    recorder = batches._recorder
    return recorder if isinstance(recorder, Jobs) else None


def _keep_result(record: CapturedJob, value: Any) -> None:
    """Keep what a kept job returned as dj.result() would give it; the checks production makes on
    a return value fail the test here (production keeps the reason instead, see dj.results)."""
    if record.keep is not None:
        from ..results import encode_result

        text, error = encode_result(value)
        if error is not None:
            raise ResultError(f"job {record.id} ({record.task}) returned a value that cannot be kept: {error}")
        record.result = json.loads(text)  # type: ignore[arg-type]


async def _wrap(awaitable: Any) -> Any:
    return await awaitable


def _check_driver(conn: Any) -> None:
    """Production refuses a SQLAlchemy `conn=` on another driver than psycopg when it writes;
    refuse it here too, from the engine's dialect, which needs no connection."""
    if conn is None or not type(conn).__module__.startswith("sqlalchemy."):
        return  # `using()` has refused anything that is neither psycopg's nor SQLAlchemy's
    try:
        bind = conn.get_bind() if hasattr(conn, "get_bind") else conn
    except Exception:  # noqa: BLE001 - a Session bound to nothing: production fails on its own terms
        return
    connections._check_driver(conn, bind.dialect)
