"""Executors: where claimed jobs run.

- ThreadExecutor runs sync jobs on `concurrency` runner threads fed through a queue, and keeps the
  timeouts of the attempts it runs: a thread cannot be stopped, so a timed-out attempt is failed at
  once, its thread stays busy (and takes a slot) until the function returns, and its late outcome
  is dropped.
- AsyncExecutor runs coroutine jobs (`@job` on an `async def`) on one event loop, in a thread of
  its own, up to `async_concurrency` at once. A timeout cancels the job for real (CancelledError
  inside it). A watchdog thread warns, once per task, about a job that blocks the loop.

Both append outcomes to the worker's deque and wake the main loop when it is worth a round trip.
"""

from __future__ import annotations

import asyncio
import math
import queue as queue_mod
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import tracing
from ..context import JobContext, _set_current
from ..errors import Permanent
from ..task import lookup
from .jobs import Claimed, Outcome, _clip, _describe, kept_outcome, log, log_job, malformed, unknown_task

if TYPE_CHECKING:
    from . import Worker

TIMEOUT_CHECK_INTERVAL = 0.05
# The event loop's heartbeat: a callback every TICK_SECONDS; a loop that has not run it for
# BLOCKED_SECONDS more is blocked by whatever step is running on it.
TICK_SECONDS = 0.1
BLOCKED_SECONDS = 0.5
# Async jobs claimed ahead of free slots: about BUFFER_SECONDS of work (see producer.py), at most this.
MAX_ASYNC_BUFFER = 1024


class ThreadExecutor:
    def __init__(self, worker: "Worker"):
        self.concurrency = worker.concurrency
        self.name = worker.name
        self.log_jobs = worker.log_jobs
        self.default_timeout = worker.default_timeout
        self._spawn = worker._spawn
        self._held = worker._held
        self._results = worker._results
        self._wake = worker._wake
        self._todo: queue_mod.SimpleQueue[Claimed | None] = queue_mod.SimpleQueue()
        # The held jobs with a timeout: most jobs have none, and the timeout checks need not look
        # at a thousand quick jobs per cycle.
        self._timed: dict[int, Claimed] = {}
        # Attempts that timed out while their thread still runs them, by (id, attempts).
        self.abandoned: dict[tuple[int, int], Claimed] = {}
        self._abandon_lock = threading.Lock()
        self._timeouts_checked_at = -math.inf
        self.stuck = False
        # A moving average of the attempts' run time, by which the producer sizes its buffer.
        self.avg_runtime = 0.05
        # Runner threads wake the main loop when fewer jobs than this wait to start, or when this
        # many outcomes wait to be recorded (set by the producer as it resizes its buffer).
        self.refill_at = max(1, self.concurrency // 2)
        self.flush_at = self.concurrency

    def start(self) -> None:
        if tracing.ENABLED:  # each attempt in a `dj perform` span, if a tracer provider is installed
            self._execute = tracing.performing(self._execute)  # type: ignore[method-assign,assignment]
        for i in range(self.concurrency):
            self._spawn(self._run_jobs, f"dj-runner-{i}")

    def submit(self, jobs: list[Claimed]) -> None:
        timed, put = self._timed, self._todo.put
        for job in jobs:
            if job.timeout or self.default_timeout:
                timed[job.id] = job
            put(job)

    def take_unstarted(self, which: Callable[[Claimed], bool] | None = None) -> list[Claimed]:
        """Remove and return the jobs waiting for a thread (those for which `which` is true)."""
        keep, give = [], []
        while True:
            try:
                job = self._todo.get_nowait()
            except queue_mod.Empty:
                break
            if job is not None:
                (give if which is None or which(job) else keep).append(job)
        for job in keep:
            self._todo.put(job)
        return give

    def stop(self) -> None:
        """Let each runner thread return once it is done with its job (call take_unstarted first)."""
        for _ in range(self.concurrency):
            self._todo.put(None)

    # --- the runner threads -----------------------------------------------------------------------

    def _run_jobs(self) -> None:
        todo, results, wake, lock, abandoned = self._todo, self._results, self._wake, self._abandon_lock, self.abandoned
        execute, monotonic = self._execute, time.monotonic
        while True:
            job = todo.get()
            if job is None:
                return
            job.started = monotonic()
            if self.log_jobs:
                log_job(job, None)
            outcome = execute(job)
            if self.log_jobs:
                log_job(job, outcome)
            outcome.seconds = monotonic() - job.started
            # A moving average is enough to size the buffer; races between threads only blur it.
            self.avg_runtime += 0.05 * (outcome.seconds - self.avg_runtime)
            with lock:  # enforce_timeouts may be failing this attempt right now
                job.finished = True
                late = abandoned.pop((job.id, job.attempts), None) is not None
            if not late:  # a timed-out attempt was failed already: its late outcome is dropped
                results.append(outcome)
            # Wake the main loop only when it has something worth a round trip: the buffer needs
            # a refill, or enough outcomes have piled up. Otherwise it flushes within flush_interval.
            if todo.qsize() < self.refill_at or len(results) >= self.flush_at:
                wake.set()

    def _execute(self, job: Claimed) -> Outcome:
        task = lookup(job.task)
        if task is None:
            return unknown_task(job)
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            return Outcome(job, malformed(job), dead=True)
        token = _set_current(JobContext(job.id, job.task, job.queue, job.attempts, self.name))
        try:
            value = task.fn(*job.args, **job.kwargs)
            return Outcome(job) if job.keep is None else kept_outcome(job, value)
        except Permanent as exc:
            return Outcome(job, _describe(exc), dead=True, exc=exc)
        except BaseException as exc:  # noqa: BLE001 - a job must never take its thread down
            return Outcome(job, _describe(exc), dead=job.attempts >= job.max_attempts, exc=exc)
        finally:
            _set_current(None, token)

    # --- timeouts ---------------------------------------------------------------------------------

    def timeout_of(self, job: Claimed) -> float | None:
        return job.timeout or self.default_timeout

    def _timed_jobs(self) -> list[Claimed]:
        """The held jobs that have a timeout. Jobs no longer held are dropped here, lazily, rather
        than at each of the places that stop holding a job."""
        for job_id, job in list(self._timed.items()):
            if self._held.get(job_id) is not job:
                del self._timed[job_id]
        return list(self._timed.values())

    def enforce_timeouts(self) -> None:
        # Timeouts are seconds long: a scan every 50 ms, not every cycle, is precise enough.
        now = time.monotonic()
        if now < self._timeouts_checked_at + TIMEOUT_CHECK_INTERVAL:
            return
        self._timeouts_checked_at = now
        for job in self._timed_jobs():
            limit = self.timeout_of(job)
            if job.started is not None and now - job.started > limit:
                with self._abandon_lock:
                    if job.finished or (job.id, job.attempts) in self.abandoned:
                        continue
                    self.abandoned[(job.id, job.attempts)] = job
                self._results.append(Outcome(job, f"timed out after {limit:g} s",
                                             dead=job.attempts >= job.max_attempts, seconds=now - job.started))

    def all_stuck(self) -> bool:
        """Whether every runner thread is stuck: still inside a job past twice its timeout. Python
        cannot stop a thread, so the worker then stops instead (run() raises WorkerStuck once the
        other jobs are handed back) and its supervisor starts a fresh process."""
        if len(self.abandoned) < self.concurrency:
            return False
        now = time.monotonic()
        stuck = [j for j in list(self.abandoned.values()) if now - j.started > 2 * self.timeout_of(j)]
        if len(stuck) < self.concurrency:
            return False
        log.error("all %d runner threads are stuck in jobs far past their timeout (%s); handing back the other "
                  "jobs and stopping, so that a fresh worker takes over", self.concurrency,
                  ", ".join(f"job {j.id} {_clip(j.task, 100)}" for j in stuck[:5]))
        self.stuck = True
        return True

    def next_wait(self, wait: float) -> float:
        """`wait`, shortened so that the main loop wakes in time for the next timeout."""
        now = time.monotonic()
        for job in self._timed_jobs():
            limit = self.timeout_of(job)
            if job.started is not None:
                wait = min(wait, max(0.01, job.started + limit - now))
            else:  # it may start any moment (nothing wakes us then): keep its timeout tight
                wait = min(wait, max(0.05, limit / 10))
        for job in list(self.abandoned.values()):  # when they will count as stuck (all_stuck)
            stuck_at = job.started + 2 * self.timeout_of(job)
            if stuck_at > now:
                wait = min(wait, stuck_at - now + 0.01)
        return wait


class AsyncExecutor:
    """Runs coroutine jobs on an event loop of the worker's own, started with the first async job.

    Threads: the producer submits jobs (under `_lock`, into `_pending`); on the loop, up to
    `concurrency` runner tasks take pending jobs one after another and append their outcomes; the
    watchdog thread looks at the loop's heartbeat.

    A runner is an asyncio task that runs jobs in turn, `await`ing each one directly, rather than
    a task per job: a job that never suspends (a no-op, a cache hit) then costs no trip through
    the loop's scheduler. Runners start when jobs arrive and end when none is pending. As in a
    runner thread, `dj.current_job()` is set around each job, and the asyncio tasks a job creates
    inherit it."""

    def __init__(self, worker: "Worker"):
        self.concurrency = worker.async_concurrency
        self.name = worker.name
        self.log_jobs = worker.log_jobs
        self.default_timeout = worker.default_timeout
        self._spawn = worker._spawn
        self._results = worker._results
        self._wake = worker._wake
        self._lock = threading.Lock()
        self._pending: deque[Claimed] = deque()  # claimed, not started (guarded by _lock)
        self._running: dict[asyncio.Task, Claimed] = {}  # each runner's job; the loop thread's
        self._runners = 0
        self._timed_out: set[int] = set()  # job ids whose timeout cancelled them; the loop thread's
        # Jobs in hand = submitted - finished - returned, each counter written by one thread only.
        self.submitted = self.returned = 0  # by the producer
        self.finished = 0  # by the loop
        self.avg_runtime = 0.05
        self.refill_at = max(1, self.concurrency // 2)
        self.flush_at = self.concurrency
        self.loop: asyncio.AbstractEventLoop | None = None
        self._accepting = True
        self._closed = threading.Event()
        self._tick = 0.0
        self._warned: set[str] = set()

    @property
    def busy(self) -> int:
        """Jobs handed to this executor and not finished yet (started or not)."""
        return self.submitted - self.finished - self.returned

    def start(self) -> None:
        if tracing.ENABLED:  # each attempt in a `dj perform` span, if a tracer provider is installed
            self._execute = tracing.performing_async(self._execute)  # type: ignore[method-assign,assignment]
        started = threading.Event()

        def run_loop() -> None:
            loop = self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.call_soon(self._beat)
            loop.call_soon(started.set)
            loop.run_forever()

        self._spawn(run_loop, "dj-event-loop")
        started.wait()
        self._spawn(self._watch, "dj-loop-watchdog")

    def submit(self, jobs: list[Claimed]) -> None:
        if self.loop is None:
            self.start()
        with self._lock:
            self._pending.extend(jobs)
        self.submitted += len(jobs)
        self.loop.call_soon_threadsafe(self._fill)

    def take_unstarted(self, which: Callable[[Claimed], bool] | None = None) -> list[Claimed]:
        with self._lock:
            give = [j for j in self._pending if which is None or which(j)]
            if give:
                self._pending = deque(j for j in self._pending if not (which is None or which(j)))
        self.returned += len(give)
        return give

    def stop(self) -> None:
        """Start no more jobs (call take_unstarted first); running ones go on."""
        self._accepting = False

    def close(self, grace: float = 1.0) -> None:
        """Cancel the jobs still running (they were handed back) and stop the loop."""
        if self.loop is None:
            return

        async def cancel_all() -> None:
            runners = list(self._running)
            for t in runners:
                t.cancel()
            if runners:
                await asyncio.wait(runners, timeout=grace)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(grace + 1)
        except Exception:  # noqa: BLE001 - a blocked loop: the process exits anyway
            pass
        self._closed.set()
        self.loop.call_soon_threadsafe(self.loop.stop)

    # --- on the loop ------------------------------------------------------------------------------

    def _fill(self) -> None:
        """Start runners for the pending jobs, up to `concurrency` in all."""
        if not self._accepting:
            return
        start = min(len(self._pending), self.concurrency - self._runners)
        for _ in range(start):
            self._runners += 1
            self.loop.create_task(self._runner())

    async def _runner(self) -> None:
        me = asyncio.current_task()
        loop, lock, running, results, wake = self.loop, self._lock, self._running, self._results, self._wake
        monotonic = time.monotonic
        yielded = monotonic()
        try:
            while self._accepting:
                with lock:
                    if not self._pending:
                        return
                    job = self._pending.popleft()
                running[me] = job
                job.started = started = monotonic()
                if self.log_jobs:
                    log_job(job, None)
                limit = job.timeout or self.default_timeout
                timer = loop.call_later(limit, self._expire, me, job) if limit else None
                outcome = await self._execute(job)
                if timer is not None:
                    timer.cancel()
                timed_out = job.id in self._timed_out
                if timed_out:  # even if the job swallowed the CancelledError
                    self._timed_out.discard(job.id)
                    outcome = Outcome(job, f"timed out after {limit:g} s", dead=job.attempts >= job.max_attempts)
                if self.log_jobs:
                    log_job(job, outcome)
                now = monotonic()
                outcome.seconds = now - started
                self.avg_runtime += 0.05 * (outcome.seconds - self.avg_runtime)
                job.finished = True
                del running[me]
                results.append(outcome)
                self.finished += 1
                if len(self._pending) < self.refill_at or len(results) >= self.flush_at:
                    wake.set()
                if timed_out:
                    return  # a cancellation may still be pending on this task: it must not hit the next job
                if now - yielded > 0.005:  # jobs that never suspend must not starve the loop
                    await asyncio.sleep(0)
                    yielded = monotonic()
        finally:
            running.pop(me, None)
            self._runners -= 1
            if self._pending:
                self._fill()

    async def _execute(self, job: Claimed) -> Outcome:
        task = lookup(job.task)
        if task is None:
            return unknown_task(job)
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            return Outcome(job, malformed(job), dead=True)
        token = _set_current(JobContext(job.id, job.task, job.queue, job.attempts, self.name))
        try:
            value = await task.fn(*job.args, **job.kwargs)
            return Outcome(job) if job.keep is None else kept_outcome(job, value)
        except Permanent as exc:
            return Outcome(job, _describe(exc), dead=True, exc=exc)
        except BaseException as exc:  # noqa: BLE001 - a job must never take its runner down
            return Outcome(job, _describe(exc), dead=job.attempts >= job.max_attempts, exc=exc)
        finally:
            _set_current(None, token)

    def _expire(self, runner: asyncio.Task, job: Claimed) -> None:
        if self._running.get(runner) is job:
            self._timed_out.add(job.id)
            runner.cancel(f"dj: job {job.id} timed out")

    def _beat(self) -> None:
        self._tick = time.monotonic()
        self.loop.call_later(TICK_SECONDS, self._beat)

    # --- the watchdog thread ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Warn, once per task, about a job that holds the loop: no other async job of this worker
        runs meanwhile. Like asyncio's debug mode (slow_callback_duration), but always on and
        nearly free: this thread samples the loop's current task and its job. A job seen running
        in every sample for BLOCKED_SECONDS, while the loop's heartbeat (_beat) did not run once,
        is one step of that job that long: in one pass of the loop each task takes one step."""
        loop = self.loop
        suspect: Claimed | None = None
        since, tick = 0.0, -1.0
        while not self._closed.wait(TICK_SECONDS):
            current, now = asyncio.current_task(loop), time.monotonic()
            job = self._running.get(current) if current is not None else None
            if job is None or job is not suspect or self._tick != tick:
                suspect, since, tick = job, now, self._tick
                continue
            if now - since < BLOCKED_SECONDS:
                continue
            suspect = None  # one warning per blocking step at most
            if job.task in self._warned:
                continue
            self._warned.add(job.task)
            log.warning("async job %d (%s) has blocked the event loop for %.1fs: the worker's other async jobs "
                        "wait meanwhile. Await instead, or run blocking code in a thread (await "
                        "asyncio.to_thread(...)). Warned once per task.", job.id, _clip(job.task, 200), now - since,
                        extra={"event": "loop_blocked", "job_id": job.id, "task": job.task,
                               "blocked_s": round(now - since, 3)})
