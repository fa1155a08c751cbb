"""The worker: claims jobs in batches, runs them on a thread pool, and records their outcomes.

Threads of one worker process:
- the main loop: claims jobs, flushes finished attempts in batches, enforces timeouts;
- `concurrency` runner threads, fed through a queue;
- a listener on its own connection (LISTEN dj_jobs), which wakes the main loop on enqueue;
- a heartbeat thread on its own connection, which also reclaims jobs of dead workers.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import random
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from . import cron, db, sql
from .context import JobContext, _set_current
from .errors import Permanent
from .task import PRIORITY_MAX, PRIORITY_MIN, load_task_modules, lookup

log = logging.getLogger("dj.worker")

MAX_ERROR_CHARS = 20_000
DEFAULT_LOCK_TIMEOUT = 300.0


def retry_delay(attempts: int) -> float:
    """DelayedJob's backoff, attempts**4 + 5 seconds, plus up to 10% jitter so retries spread out."""
    base = attempts**4 + 5
    return base + random.uniform(0, base * 0.1)


@dataclass
class Claimed:
    id: int
    task: str
    args: Any
    kwargs: Any
    attempts: int
    max_attempts: int
    timeout: float | None
    queue: str
    priority: int
    run_at: datetime
    started: float | None = field(default=None)


@dataclass
class Outcome:
    job: Claimed
    error: str | None = None  # None means success
    dead: bool = False


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    dead: int = 0


class Worker:
    def __init__(
        self,
        queues: list[str] | tuple[str, ...] = ("default",),
        concurrency: int = 8,
        *,
        min_priority: int | None = None,
        max_priority: int | None = None,
        database_url: str | None = None,
        poll_interval: float = 5.0,
        prefetch: int | None = None,
        lock_timeout: float | None = None,
        heartbeat_interval: float = 5.0,
        shutdown_timeout: float = 25.0,
        default_timeout: float | None = None,
        name: str | None = None,
        parent_pid: int | None = None,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.queues = list(dict.fromkeys(queues)) or ["default"]
        self.concurrency = concurrency
        self.min_priority = PRIORITY_MIN if min_priority is None else min_priority
        self.max_priority = PRIORITY_MAX if max_priority is None else max_priority
        if self.min_priority > self.max_priority:
            raise ValueError("min_priority is greater than max_priority")
        self.url = database_url or db.database_url()
        self.poll_interval = poll_interval
        # Claimed jobs waiting locally for a free thread, so that one claim round trip serves many
        # jobs. Unstarted jobs are handed back on shutdown.
        self.capacity = concurrency + (concurrency if prefetch is None else prefetch)
        self.claim_at = max(1, self.capacity // 2)
        self.refill_at = max(1, concurrency // 2)
        self.flush_at = max(1, self.capacity // 2)
        self.flush_interval = 0.005
        self.lock_timeout = float(lock_timeout or os.environ.get("DJ_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
        self.heartbeat_interval = min(heartbeat_interval, self.lock_timeout / 3)
        self.shutdown_timeout = shutdown_timeout
        self.default_timeout = default_timeout
        self.host = socket.gethostname()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.counts = Counts()

        self._held: dict[int, Claimed] = {}
        self._todo: queue_mod.SimpleQueue[Claimed | None] = queue_mod.SimpleQueue()
        self._results: deque[Outcome] = deque()
        self._abandoned: set[int] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._more_ready = True
        self._conn: psycopg.Connection | None = None
        self._threads: list[threading.Thread] = []
        self._signals = 0

    # --- public ---------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> Counts:
        """Work until stopped (SIGTERM/SIGINT or stop()), or with burst=True until no ready job is left."""
        load_task_modules()
        self._install_signal_handlers()
        self._conn = db.connect(self.url, autocommit=True)
        db.ensure_schema(self._conn)
        self._register()
        for i in range(self.concurrency):
            self._spawn(self._run_jobs, f"dj-runner-{i}")
        self._spawn(self._listen, "dj-listener")
        self._spawn(self._heartbeat, "dj-heartbeat")
        log.info("worker %s started: queues=%s concurrency=%d", self.name, ",".join(self.queues), self.concurrency)
        try:
            self._loop(burst)
        finally:
            self._shutdown()
        return self.counts

    def stop(self) -> None:
        """Claim nothing more, finish running jobs, hand back the rest, return from run()."""
        self._stopping.set()
        self._wake.set()

    # --- main loop ------------------------------------------------------------------------------

    def _loop(self, burst: bool) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._enforce_timeouts()
                claimed = self._cycle()
                backoff = 0.5
            except psycopg.OperationalError as exc:
                log.warning("database connection lost (%s); reconnecting in %.1fs", _first_line(exc), backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                self._reconnect()
                continue
            if burst and not claimed and not self._held and not self._results and not self._more_ready:
                return
            if claimed and self._more_ready and self._room() >= self.claim_at:
                continue
            self._wake.wait(self._next_wait())
            if not self._wake.is_set() and not self._results:
                self._more_ready = True  # the poll interval ran out: look again even without NOTIFY
            self._wake.clear()

    def _room(self) -> int:
        # A timed-out job's thread stays busy until the function returns, so it still takes a slot.
        return self.capacity - len(self._held) - len(self._abandoned)

    def _cycle(self) -> int:
        """One round trip: record the finished attempts, and claim more jobs if there is room.

        Returns how many jobs were claimed.
        """
        outcomes: list[Outcome] = []
        while self._results:
            outcomes.append(self._results.popleft())
        room = self._room() + len(outcomes)
        idle = self.concurrency - (self.capacity - room)
        # Claim when a thread is idle or the buffer has drained to the refill mark. Claiming one
        # job each time one finishes would cost a round trip per job.
        claim = self._more_ready and room > 0 and (idle > 0 or room >= self.claim_at)
        if not outcomes and not claim:
            return 0
        ok = [o.job for o in outcomes if o.error is None]
        bad = [o for o in outcomes if o.error is not None]
        try:
            with self._conn.pipeline():
                woken = []  # queues with new work: batch callbacks, freed slots of limited queues
                if ok:
                    woken.append(self._conn.execute(sql.COMPLETE, {
                        "ids": [j.id for j in ok], "attempts": [j.attempts for j in ok], "worker": self.name}))
                if bad:
                    woken.append(self._conn.execute(sql.FAIL, {
                        "ids": [o.job.id for o in bad], "attempts": [o.job.attempts for o in bad],
                        "errors": [o.error[:MAX_ERROR_CHARS] for o in bad],
                        "delays": [retry_delay(o.job.attempts) for o in bad],
                        "dead": [o.dead for o in bad], "worker": self.name}))
                cur = self._claim(room) if claim else None
        except BaseException:
            self._results.extendleft(reversed(outcomes))  # record them after reconnecting
            raise
        self._count(outcomes)
        woke = any(queue in self.queues for c in woken for queue, _ in c.fetchall())
        if cur is None:
            self._more_ready = self._more_ready or woke
            return 0
        rows = cur.fetchall()
        self._more_ready = len(rows) == room or woke
        rows.sort(key=lambda r: (r[8], r[9], r[0]))
        for row in rows:
            job = Claimed(*row)
            self._held[job.id] = job
            self._todo.put(job)
        return len(rows)

    def _claim(self, room: int) -> psycopg.Cursor:
        with self._conn.transaction():
            self._conn.execute(sql.LOCK_LIMITED_QUEUES, {"queues": self.queues})
            return self._conn.execute(sql.CLAIM, {
                "queues": self.queues, "min_priority": self.min_priority, "max_priority": self.max_priority,
                "limit": room, "worker": self.name})

    def _count(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self._held.pop(o.job.id, None)
            if o.error is None:
                self.counts.succeeded += 1
            elif o.dead:
                self.counts.dead += 1
                log.warning("job %d (%s) is dead after attempt %d: %s", o.job.id, o.job.task, o.job.attempts,
                            o.error.strip().splitlines()[-1] if o.error.strip() else "")
            else:
                self.counts.failed += 1

    def _flush(self) -> None:
        """Record finished attempts without claiming (used while shutting down)."""
        more, self._more_ready = self._more_ready, False
        try:
            self._cycle()
        finally:
            self._more_ready = more

    def _next_wait(self) -> float:
        if self._results:
            return self.flush_interval
        wait = self.poll_interval
        now = time.monotonic()
        for job in list(self._held.values()):
            limit = self._timeout_of(job)
            if limit and job.started is not None:
                wait = min(wait, max(0.01, job.started + limit - now))
        return wait

    # --- running jobs ---------------------------------------------------------------------------

    def _run_jobs(self) -> None:
        while True:
            job = self._todo.get()
            if job is None:
                return
            job.started = time.monotonic()
            outcome = self._execute(job)
            if job.id in self._abandoned:  # timed out: its attempt was already failed
                self._abandoned.discard(job.id)
            else:
                self._results.append(outcome)
            # Wake the main loop only when it has something worth a round trip: the buffer needs
            # a refill, or enough outcomes have piled up. Otherwise it flushes within flush_interval.
            if self._todo.qsize() < self.refill_at or len(self._results) >= self.flush_at:
                self._wake.set()

    def _execute(self, job: Claimed) -> Outcome:
        task = lookup(job.task)
        if task is None:
            return Outcome(job, f"unknown task {job.task!r}: no @job with this name is registered", dead=True)
        if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
            return Outcome(job, "malformed job: args must be a JSON array and kwargs a JSON object", dead=True)
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

    def _timeout_of(self, job: Claimed) -> float | None:
        return job.timeout or self.default_timeout

    def _enforce_timeouts(self) -> None:
        now = time.monotonic()
        for job in list(self._held.values()):
            limit = self._timeout_of(job)
            if limit and job.started is not None and now - job.started > limit and job.id not in self._abandoned:
                self._abandoned.add(job.id)
                self._results.append(Outcome(job, f"timed out after {limit:g} s",
                                             dead=job.attempts >= job.max_attempts))

    # --- background threads ---------------------------------------------------------------------

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute("LISTEN " + sql.NOTIFY_CHANNEL)
                    backoff = 0.5
                    self._more_ready = True  # we may have missed notifications while away
                    self._wake.set()
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.payload in self.queues:
                                self._more_ready = True
                                self._wake.set()
            except psycopg.Error:
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _heartbeat(self) -> None:
        conn: psycopg.Connection | None = None
        last_reap = 0.0
        while not self._stopping.wait(self.heartbeat_interval if conn else 1.0):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor %d is gone; stopping", self.parent_pid)
                self.stop()
                return
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, autocommit=True)
                running = sum(1 for j in list(self._held.values()) if j.started is not None)
                if conn.execute(sql.HEARTBEAT, (running, self.name)).rowcount == 0:
                    self._register(conn)  # our row was removed while we were away
                if time.monotonic() - last_reap > self.lock_timeout / 4:
                    last_reap = time.monotonic()
                    self._reap(conn)
                cron.fire_due(conn)  # enqueue due cron ticks, each once across all workers
            except psycopg.Error as exc:
                log.warning("heartbeat failed (%s); retrying", _first_line(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _reap(self, conn: psycopg.Connection) -> None:
        params = {"lock_timeout": self.lock_timeout}
        reaped = conn.execute(sql.REAP_ORPHANS, params).fetchall()
        if reaped:
            log.warning("reclaimed %d job(s) from workers that stopped heartbeating", len(reaped))
            for queue in sorted({q for _, q in reaped}):
                conn.execute(sql.NOTIFY, (queue,))
        conn.execute(sql.FORGET_STALE_WORKERS, params)
        conn.execute(sql.PRUNE_STATS)

    def _register(self, conn: psycopg.Connection | None = None) -> None:
        conn = conn or self._conn
        conn.execute(sql.REGISTER_WORKER, {"name": self.name, "host": self.host, "pid": os.getpid(),
                                           "queues": self.queues, "concurrency": self.concurrency})
        if conn is self._conn:
            conn.execute(sql.CLEAR_OWN_LOCKS, (self.name,))

    def _reconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        try:
            self._conn = psycopg.connect(self.url, autocommit=True)
            log.info("database connection restored")
        except psycopg.OperationalError:
            self._conn = _ClosedConnection()

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # --- shutdown -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum, frame):
            self._signals += 1
            if self._signals == 1:
                log.info("received %s: finishing running jobs (up to %gs), claiming nothing more",
                         signal.Signals(signum).name, self.shutdown_timeout)
                self.stop()
            else:
                log.warning("received %s again: stopping now", signal.Signals(signum).name)
                self._hand_back_everything_now()
                os._exit(0)

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _shutdown(self) -> None:
        self._stopping.set()
        unstarted = []
        while True:
            try:
                job = self._todo.get_nowait()
            except queue_mod.Empty:
                break
            if job is not None:
                unstarted.append(job)
        for _ in range(self.concurrency):
            self._todo.put(None)
        deadline = time.monotonic() + self.shutdown_timeout
        self._release(unstarted)
        while time.monotonic() < deadline:
            try:
                self._flush()
            except psycopg.OperationalError:
                self._reconnect()
            if not self._held:
                break
            self._wake.wait(0.05)
            self._wake.clear()
        if self._held:
            log.warning("%d job(s) still running after %gs; handing them back", len(self._held),
                        self.shutdown_timeout)
            self._release(list(self._held.values()))
        try:
            self._conn.execute(sql.UNREGISTER_WORKER, (self.name,))
        except psycopg.Error:
            pass
        self._conn.close()
        log.info("worker %s stopped: %d succeeded, %d failed, %d dead", self.name, self.counts.succeeded,
                 self.counts.failed, self.counts.dead)

    def _release(self, jobs: list[Claimed]) -> None:
        if not jobs:
            return
        try:
            self._conn.execute(sql.RELEASE, {"ids": [j.id for j in jobs], "attempts": [j.attempts for j in jobs],
                                             "started": [j.started is not None for j in jobs],
                                             "worker": self.name})
        except psycopg.Error as exc:
            log.warning("could not hand back %d job(s) (%s); they return after the lock timeout",
                        len(jobs), _first_line(exc))
        for j in jobs:
            self._held.pop(j.id, None)

    def _hand_back_everything_now(self) -> None:
        jobs = list(self._held.values())
        if not jobs:
            return
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                conn.execute(sql.RELEASE, {"ids": [j.id for j in jobs], "attempts": [j.attempts for j in jobs],
                                           "started": [j.started is not None for j in jobs], "worker": self.name})
                conn.execute(sql.UNREGISTER_WORKER, (self.name,))
        except psycopg.Error:
            pass


class _ClosedConnection:
    """Stands in for a connection while the database is unreachable; every use raises."""

    closed = True

    def execute(self, *a, **k):
        raise psycopg.OperationalError("not connected")

    def pipeline(self):
        raise psycopg.OperationalError("not connected")

    def close(self):
        pass


def _describe(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: BLE001 - a hostile __str__ or __repr__
        text = f"{type(exc).__name__} (its message could not be formatted)"
    text = text.replace("\x00", "\\0")  # PostgreSQL text cannot hold NUL
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS // 2] + "\n...[truncated]...\n" + text[-MAX_ERROR_CHARS // 2:]
    return text


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
