"""Executors: where claimed jobs run. The thread executor runs sync jobs on `concurrency` runner
threads fed through a queue, and keeps the timeouts of the attempts it runs: a thread cannot be
stopped, so a timed-out attempt is failed at once, its thread stays busy (and takes a slot) until
the function returns, and its late outcome is dropped."""

from __future__ import annotations

import math
import queue as queue_mod
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..context import JobContext, _set_current
from ..errors import Permanent
from ..task import lookup
from .jobs import Claimed, Outcome, _clip, _describe, log, log_job, malformed, unknown_task

if TYPE_CHECKING:
    from . import Worker

TIMEOUT_CHECK_INTERVAL = 0.05


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
            task.fn(*job.args, **job.kwargs)
            return Outcome(job)
        except Permanent as exc:
            return Outcome(job, _describe(exc), dead=True)
        except BaseException as exc:  # noqa: BLE001 - a job must never take its thread down
            return Outcome(job, _describe(exc), dead=job.attempts >= job.max_attempts)
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
