"""The worker: claims jobs in batches, runs them on a thread pool, and records their outcomes.

Threads of one worker process:
- the main loop: claims jobs, flushes finished attempts in batches, enforces timeouts;
- `concurrency` runner threads, fed through a queue;
- a listener on its own connection (LISTEN dj_jobs), which wakes the main loop on enqueue;
- a heartbeat thread on its own connection, which also reclaims jobs of dead workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue as queue_mod
import random
import signal
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import cron, db, sql
from .context import JobContext, _set_current
from .config import mask_secrets
from .errors import Permanent, WorkerStuck
from .task import MAX_ARGS_BYTES, PRIORITY_MAX, PRIORITY_MIN, load_task_modules, lookup

log = logging.getLogger("dj.worker")

MAX_ERROR_CHARS = 20_000
BUFFER_SECONDS = 0.02
# The cap binds only for jobs under 0.15 ms. Each claim-and-finish cycle pays a commit (a WAL
# flush), so bigger batches drain faster: with 8 threads, 32 -> 65k jobs/s, 64 -> 85k, 128 -> 97k
# on 2 processes (256 gains nothing more).
MAX_PREFETCH_PER_THREAD = 128
DEFAULT_LOCK_TIMEOUT = 300.0
TIMEOUT_CHECK_INTERVAL = 0.05


def retry_delay(attempts: int) -> float:
    """DelayedJob's backoff, attempts**4 + 5 seconds, plus up to 10% jitter so retries spread out."""
    base = attempts**4 + 5
    return base + random.uniform(0, base * 0.1)


def reconnect_delay(failures: int, cap: float = 30.0) -> float:
    """Capped exponential backoff between reconnection attempts: 0.5 s, 1 s, 2 s ... up to `cap`,
    each within +-20% so that the workers of a restarted server do not all knock at once."""
    return min(cap, 0.5 * 2 ** min(failures, 16)) * random.uniform(0.8, 1.2)


class _Undecodable:
    """Stands in for a job's args or kwargs that the worker refuses to decode; the job goes dead."""

    def __init__(self, reason: str):
        self.reason = reason


# PostgreSQL prints jsonb with a space after each ',' and ':', so a row that passed enqueue's limit
# can come back up to about twice as long.
MAX_CLAIMED_ARGS_BYTES = 2 * MAX_ARGS_BYTES


def _load_job_json(data: str) -> Any:
    """json.loads for a claimed job's args or kwargs: a row written by hand with enormous or
    absurdly nested JSON must fail that job, not the claim of a batch.

    The claim returns them as text and they are decoded here, not by a psycopg loader: a loader
    is a Python call per column, and with the run_at datetime it was most of the claim's cost
    per job on the worker's side (2.2 us a row against 0.9)."""
    if data == "[]":  # most jobs: skip the decoder
        return []
    if data == "{}":
        return {}
    if len(data) > MAX_CLAIMED_ARGS_BYTES:
        return _Undecodable(f"arguments too large: {len(data) / 1e6:.1f} MB of JSON; the limit is "
                            f"{MAX_ARGS_BYTES / 1e6:g} MB")
    try:
        return json.loads(data)
    except (RecursionError, ValueError) as exc:
        return _Undecodable(f"arguments could not be decoded: {_clip(str(exc), 200)}")


@dataclass(slots=True)
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
    run_at: float  # seconds since the epoch: only the claim order needs it
    started: float | None = field(default=None)
    finished: bool = field(default=False)


@dataclass
class Outcome:
    job: Claimed
    error: str | None = None  # None means success
    dead: bool = False
    seconds: float = 0.0  # how long the attempt ran


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
        log_jobs: bool = False,
        summary_interval: float = 30.0,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.queues = list(dict.fromkeys(queues)) or ["default"]
        self.concurrency = concurrency
        self.min_priority = PRIORITY_MIN if min_priority is None else min_priority
        self.max_priority = PRIORITY_MAX if max_priority is None else max_priority
        if self.min_priority > self.max_priority:
            raise ValueError("min_priority is greater than max_priority")
        self.log_jobs = log_jobs
        self.summary_interval = summary_interval
        self._summary_at = time.monotonic() + summary_interval
        self._summarised = Counts()
        self._paused: set[str] = set()
        self.url = database_url or db.database_url()
        self.poll_interval = poll_interval
        # Jobs claimed ahead of free threads, so that one claim round trip serves many jobs. By
        # default the buffer adapts to how long jobs take: about BUFFER_SECONDS of work, at least
        # one job per thread, so quick jobs are claimed hundreds at a time while slow ones are
        # never hoarded away from other workers. Unstarted jobs are handed back on shutdown.
        self.fixed_prefetch = prefetch
        self._avg_runtime = 0.05
        self.capacity = concurrency + (concurrency if prefetch is None else prefetch)
        self.refill_at = max(1, concurrency // 2)
        self.flush_interval = 0.005
        self.lock_timeout = float(lock_timeout or os.environ.get("DJ_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
        self.heartbeat_interval = min(heartbeat_interval, self.lock_timeout / 3)
        self.shutdown_timeout = shutdown_timeout
        self.default_timeout = default_timeout
        self.host = socket.gethostname()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.counts = Counts()
        # Every connection of the worker gives up on a silent peer (a cut cable, a frozen server)
        # within about half the lock timeout (2 to 30 s), instead of the kernel's 15 minutes.
        dead_after = min(30.0, max(2.0, self.lock_timeout / 2))
        self._tcp_options = {"keepalives": 1, "keepalives_idle": max(1, int(dead_after / 2)),
                             "keepalives_interval": max(1, int(dead_after / 6)), "keepalives_count": 3,
                             "tcp_user_timeout": int(dead_after * 1000)}
        self._connect_timeout = max(2, int(min(dead_after, 10)))

        self._held: dict[int, Claimed] = {}
        # The held jobs with a timeout: most jobs have none, and the timeout checks need not look
        # at a thousand quick jobs per cycle.
        self._timed: dict[int, Claimed] = {}
        self._todo: queue_mod.SimpleQueue[Claimed | None] = queue_mod.SimpleQueue()
        self._results: deque[Outcome] = deque()
        # Attempts that timed out while their thread still runs them, by (id, attempts).
        self._abandoned: dict[tuple[int, int], Claimed] = {}
        self._abandon_lock = threading.Lock()
        self._timeouts_checked_at = -math.inf
        self._stuck = False
        # Outages: the first thread whose connection fails logs one line; a connection opened in
        # an earlier epoch fails silently, since its outage was logged already.
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None
        self._epoch = 0
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
        self._conn = db.connect(self.url, autocommit=True, **self._tcp_options)
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
        if self._stuck:
            raise WorkerStuck(f"worker {self.name} stopped: all {self.concurrency} runner threads are stuck in "
                              "jobs far past their timeout")
        return self.counts

    def stop(self) -> None:
        """Claim nothing more, finish running jobs, hand back the rest, return from run()."""
        self._stopping.set()
        self._wake.set()

    # --- main loop ------------------------------------------------------------------------------

    def _loop(self, burst: bool) -> None:
        failures = 0
        epoch: int | None = self._epoch  # see _lost
        while not self._stopping.is_set():
            try:
                self._enforce_timeouts()
                if self._paused:
                    self._hand_back_paused()
                if self._all_stuck():
                    return
                claimed = self._cycle()
                self._maybe_summarise()
                failures = 0
            except psycopg.OperationalError as exc:
                self._lost(exc, epoch)
                self._stopping.wait(reconnect_delay(failures))
                failures += 1
                epoch = self._reconnect()
                continue
            if burst and not claimed and not self._held and not self._results and not self._more_ready:
                return
            if claimed and self._more_ready and self._room() >= self.capacity // 2:
                continue
            self._wake.wait(self._next_wait())
            if not self._wake.is_set() and not self._results:
                self._more_ready = True  # the poll interval ran out: look again even without NOTIFY
            self._wake.clear()

    def _maybe_summarise(self) -> None:
        """Every summary_interval, one line about what happened since the last one (if anything)."""
        now = time.monotonic()
        if now < self._summary_at:
            return
        c, last = self.counts, self._summarised
        done = Counts(c.succeeded - last.succeeded, c.failed - last.failed, c.dead - last.dead)
        if done.succeeded or done.failed or done.dead:
            elapsed = now - self._summary_at + self.summary_interval
            log.info("%d succeeded, %d failed, %d dead in the last %.0fs (%.0f jobs/s); %d held",
                     done.succeeded, done.failed, done.dead, elapsed,
                     (done.succeeded + done.failed + done.dead) / elapsed, len(self._held),
                     extra={"event": "summary", "succeeded": done.succeeded, "failed": done.failed,
                            "dead": done.dead, "seconds": round(elapsed, 1), "held": len(self._held)})
        self._summarised = Counts(c.succeeded, c.failed, c.dead)
        self._summary_at = now + self.summary_interval

    def _log_job(self, job: Claimed, outcome: Outcome | None) -> None:
        """One event per job start and end (`dj work --verbose` or `--log-format json`)."""
        if outcome is None:
            event, level = "job_started", logging.INFO
        elif outcome.error is None:
            event, level = "job_succeeded", logging.INFO
        else:
            event, level = ("job_dead", logging.WARNING) if outcome.dead else ("job_failed", logging.WARNING)
        fields = {"event": event, "job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempts}
        if outcome is not None:
            fields["duration_s"] = round(time.monotonic() - job.started, 6)
            if outcome.error is not None:
                lines = outcome.error.strip().splitlines()
                fields["error"] = lines[-1] if lines else ""
        log.log(level, "%s %d %s (attempt %d)%s", event.replace("_", " "), job.id, job.task, job.attempts,
                f" in {fields['duration_s']:.3f}s" if "duration_s" in fields else "", extra=fields)

    def _resize_buffer(self) -> None:
        if self.fixed_prefetch is None:
            per_thread = min(MAX_PREFETCH_PER_THREAD, max(1, int(BUFFER_SECONDS / max(self._avg_runtime, 1e-6))))
            self.capacity = self.concurrency * (1 + per_thread)

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
        self._resize_buffer()
        room = self._room() + len(outcomes)
        idle = self.concurrency - (self.capacity - room)
        # Claim when a thread is idle or the buffer has drained to the refill mark. Claiming one
        # job each time one finishes would cost a round trip per job.
        claim = self._more_ready and room > 0 and (idle > 0 or room >= self.capacity // 2)
        if claim:
            # Cleared before the round trip: a NOTIFY that arrives meanwhile sets it again and is
            # not lost when the claim's answer comes back.
            self._more_ready = False
        if not outcomes and not claim:
            return 0
        ok = [o for o in outcomes if o.error is None]
        bad = [o for o in outcomes if o.error is not None]
        try:
            # One transaction, so one WAL flush, for the claim and the outcomes. The claim goes first:
            # the outcomes upsert job_stats rows that every worker shares, and their row locks are
            # held until commit, so the claim must not run while this worker holds them.
            with self._conn.pipeline(), self._conn.transaction():
                cur = self._claim(room) if claim else None
                woken = []  # queues with new work: batch callbacks, freed slots of limited queues
                if ok:
                    woken.append(self._conn.execute(sql.COMPLETE, {
                        "ids": _array_literal(o.job.id for o in ok),
                        "attempts": _array_literal(o.job.attempts for o in ok),
                        "seconds": _seconds_literal(o.seconds for o in ok), "worker": self.name},
                        prepare=_prepare(ok)))
                if bad:
                    woken.append(self._conn.execute(sql.FAIL, {
                        "ids": [o.job.id for o in bad], "attempts": [o.job.attempts for o in bad],
                        "errors": [o.error[:MAX_ERROR_CHARS] for o in bad],
                        "delays": [retry_delay(o.job.attempts) for o in bad],
                        "dead": [o.dead for o in bad], "seconds": [o.seconds for o in bad], "worker": self.name},
                        prepare=_prepare(bad)))
        except BaseException:
            self._results.extendleft(reversed(outcomes))  # record them after reconnecting
            raise
        self._count(outcomes)
        woke = any(queue in self.queues for c in woken for queue, _ in c.fetchall())
        if cur is None:
            self._more_ready = self._more_ready or woke
            return 0
        rows = cur.fetchall()
        if len(rows) == room or woke:
            self._more_ready = True
        rows.sort(key=lambda r: (r[8], r[9], r[0]))
        for r in rows:
            job = Claimed(r[0], r[1], _load_job_json(r[2]), _load_job_json(r[3]), r[4], r[5], r[6], r[7], r[8], r[9])
            self._held[job.id] = job
            if self._timeout_of(job):
                self._timed[job.id] = job
            self._todo.put(job)
        return len(rows)

    def _claim(self, room: int) -> psycopg.Cursor:
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
                log.warning("job %d (%s) is dead after attempt %d: %s", o.job.id, _clip(o.job.task, 200),
                            o.job.attempts, _clip(o.error.strip().splitlines()[-1] if o.error.strip() else "", 300))
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
        for job in self._timed_jobs():
            limit = self._timeout_of(job)
            if job.started is not None:
                wait = min(wait, max(0.01, job.started + limit - now))
            else:  # it may start any moment (nothing wakes us then): keep its timeout tight
                wait = min(wait, max(0.05, limit / 10))
        for job in list(self._abandoned.values()):  # when they will count as stuck (_all_stuck)
            stuck_at = job.started + 2 * self._timeout_of(job)
            if stuck_at > now:
                wait = min(wait, stuck_at - now + 0.01)
        return wait

    # --- running jobs ---------------------------------------------------------------------------

    def _run_jobs(self) -> None:
        while True:
            job = self._todo.get()
            if job is None:
                return
            job.started = time.monotonic()
            if self.log_jobs:
                self._log_job(job, None)
            outcome = self._execute(job)
            if self.log_jobs:
                self._log_job(job, outcome)
            outcome.seconds = time.monotonic() - job.started
            # A moving average is enough to size the buffer; races between threads only blur it.
            self._avg_runtime += 0.05 * (outcome.seconds - self._avg_runtime)
            with self._abandon_lock:  # _enforce_timeouts may be failing this attempt right now
                job.finished = True
                late = self._abandoned.pop((job.id, job.attempts), None) is not None
            if not late:  # a timed-out attempt was failed already: its late outcome is dropped
                self._results.append(outcome)
            # Wake the main loop only when it has something worth a round trip: the buffer needs
            # a refill, or enough outcomes have piled up. Otherwise it flushes within flush_interval.
            if self._todo.qsize() < self.refill_at or len(self._results) >= self.capacity // 2:
                self._wake.set()

    def _execute(self, job: Claimed) -> Outcome:
        task = lookup(job.task)
        if task is None:
            return Outcome(job, f"unknown task {job.task!r}: no @job with this name is registered", dead=True)
        for value in (job.args, job.kwargs):
            if isinstance(value, _Undecodable):
                return Outcome(job, f"malformed job: {value.reason}", dead=True)
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

    def _timed_jobs(self) -> list[Claimed]:
        """The held jobs that have a timeout. Jobs no longer held are dropped here, lazily, rather
        than at each of the places that stop holding a job."""
        for job_id, job in list(self._timed.items()):
            if self._held.get(job_id) is not job:
                del self._timed[job_id]
        return list(self._timed.values())

    def _enforce_timeouts(self) -> None:
        # Timeouts are seconds long: a scan every 50 ms, not every cycle, is precise enough.
        now = time.monotonic()
        if now < self._timeouts_checked_at + TIMEOUT_CHECK_INTERVAL:
            return
        self._timeouts_checked_at = now
        for job in self._timed_jobs():
            limit = self._timeout_of(job)
            if job.started is not None and now - job.started > limit:
                with self._abandon_lock:
                    if job.finished or (job.id, job.attempts) in self._abandoned:
                        continue
                    self._abandoned[(job.id, job.attempts)] = job
                self._results.append(Outcome(job, f"timed out after {limit:g} s",
                                             dead=job.attempts >= job.max_attempts, seconds=now - job.started))

    def _all_stuck(self) -> bool:
        """Whether every runner thread is stuck: still inside a job past twice its timeout. Python
        cannot stop a thread, so the worker then stops instead (run() raises WorkerStuck once the
        other jobs are handed back) and its supervisor starts a fresh process."""
        if len(self._abandoned) < self.concurrency:
            return False
        now = time.monotonic()
        stuck = [j for j in list(self._abandoned.values()) if now - j.started > 2 * self._timeout_of(j)]
        if len(stuck) < self.concurrency:
            return False
        log.error("all %d runner threads are stuck in jobs far past their timeout (%s); handing back the other "
                  "jobs and stopping, so that a fresh worker takes over", self.concurrency,
                  ", ".join(f"job {j.id} {_clip(j.task, 100)}" for j in stuck[:5]))
        self._stuck = True
        return True

    # --- background threads ---------------------------------------------------------------------

    def _listen(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            epoch = self._epoch
            try:
                with self._connect() as conn:
                    conn.execute("LISTEN " + sql.NOTIFY_CHANNEL)
                    conn.execute("LISTEN " + sql.QUEUE_SETTINGS_CHANNEL)
                    epoch, failures = self._back(epoch), 0
                    self._more_ready = True  # we may have missed notifications while away
                    self._wake.set()
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.channel == sql.QUEUE_SETTINGS_CHANNEL:
                                self._on_settings(note.payload)
                            elif note.payload in self.queues:
                                self._more_ready = True
                                self._wake.set()
            except psycopg.Error as exc:
                self._lost(exc, epoch)
                self._stopping.wait(reconnect_delay(failures))
                failures += 1

    def _on_settings(self, payload: str) -> None:
        try:
            change = json.loads(payload)
        except ValueError:
            return
        if change.get("paused") and change.get("queue") in self.queues:
            self._paused.add(change["queue"])  # the main loop hands back its buffered jobs
            self._wake.set()

    def _hand_back_paused(self) -> None:
        """Give back the buffered, unstarted jobs of queues that were just paused; running ones finish."""
        paused, self._paused = self._paused, set()
        keep, give = [], []
        while True:
            try:
                job = self._todo.get_nowait()
            except queue_mod.Empty:
                break
            (give if job is not None and job.queue in paused else keep).append(job)
        for job in keep:
            self._todo.put(job)
        if give:
            log.info("queue(s) %s paused: handing back %d unstarted job(s)", ",".join(sorted(paused)), len(give))
            self._release(give)

    def _heartbeat(self) -> None:
        conn: psycopg.Connection | None = None
        epoch: int | None = None
        failures = 0
        last_reap = 0.0
        # While disconnected, retry with backoff, but at least once per heartbeat interval: the
        # heartbeat is what keeps our jobs from being handed to other workers.
        while not self._stopping.wait(self.heartbeat_interval if conn else
                                      min(self.heartbeat_interval, reconnect_delay(failures))):
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.warning("supervisor %d is gone; stopping", self.parent_pid)
                self.stop()
                return
            since = self._epoch
            try:
                if conn is None or conn.closed:
                    epoch = since
                    conn = self._connect()
                running = sum(1 for j in list(self._held.values()) if j.started is not None)
                if conn.execute(sql.HEARTBEAT, (running, self.name)).rowcount == 0:
                    self._register(conn)  # our row was removed while we were away
                epoch, failures = self._back(since), 0
                if time.monotonic() - last_reap > self.lock_timeout / 4:
                    last_reap = time.monotonic()
                    self._reap(conn)
                cron.fire_due(conn)  # enqueue due cron ticks, each once across all workers
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    self._lost(exc, epoch)
                    failures += 1
                else:
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

    def _reconnect(self) -> int | None:
        """Replace the main connection; returns its epoch (see _lost), None if the database is still
        out of reach."""
        if self._conn is not None:
            self._conn.close()
        self._conn = _ClosedConnection()
        since, conn = self._epoch, None
        try:
            conn = self._connect()
            # The answer to our last claim may have been lost with the connection.
            conn.execute(sql.RELEASE_UNKNOWN, {"worker": self.name, "held": list(self._held)})
        except psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
            self._lost(exc, since)
            return None
        self._conn = conn
        return self._back(since)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout,
                               **self._tcp_options)

    def _lost(self, exc: BaseException, epoch: int | None) -> None:
        """A database call failed on a connection that last worked in `epoch` (None: a stand-in
        for a connection that could not be opened). The first failure of an outage logs one line;
        the failures of older connections and every retry stay quiet, so an outage is one line, not
        a stream of them. The epoch moves on when an outage starts and when it ends."""
        with self._outage_lock:
            if self._outage_since is None and epoch == self._epoch:
                self._outage_since = time.monotonic()
                self._epoch += 1
                log.warning("database connection lost (%s); reconnecting with backoff",
                            _clip(mask_secrets(_first_line(exc), self.url), 300))
            else:
                log.debug("database still out of reach (%s)", _clip(mask_secrets(_first_line(exc), self.url), 300))

    def _back(self, since: int) -> int:
        """A call that began in epoch `since` worked: if an outage was noticed before it began, the
        outage is over (logged once). Returns the epoch the connection now belongs to."""
        with self._outage_lock:
            if self._outage_since is not None and since == self._epoch:
                log.info("database connection restored after %.1fs", time.monotonic() - self._outage_since)
                self._outage_since = None
                self._epoch += 1
                return self._epoch
            return since

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
            self._conn.execute(sql.RELEASE, self._release_params(jobs))
        except psycopg.Error as exc:
            log.warning("could not hand back %d job(s) (%s); they return after the lock timeout",
                        len(jobs), _first_line(exc))
        for j in jobs:
            self._held.pop(j.id, None)

    def _release_params(self, jobs: list[Claimed]) -> dict[str, Any]:
        return {"ids": [j.id for j in jobs], "attempts": [j.attempts for j in jobs],
                "started": [j.started is not None for j in jobs], "worker": self.name}

    def _hand_back_everything_now(self) -> None:
        jobs = list(self._held.values())
        if not jobs:
            return
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                conn.execute(sql.RELEASE, self._release_params(jobs))
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
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS // 2] + "\n...[truncated]...\n" + text[-MAX_ERROR_CHARS // 2:]
    text = text.replace("\x00", "\\0")  # PostgreSQL text cannot hold NUL
    # nor lone surrogates, which would fail the whole batch's round trip (UnicodeEncodeError)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# PostgreSQL's generic plan for COMPLETE and FAIL cannot know how long the outcome arrays are, and
# joins them to the jobs in a nested loop: quadratic, 50 us a job at 500 outcomes against 5 us with
# a plan made for the actual arrays (a hash join). Planning costs about 0.4 ms, so small flushes
# keep the prepared statement and large ones are planned afresh.
PREPARED_PLAN_MAX_OUTCOMES = 32


def _prepare(outcomes: list[Outcome]) -> bool | None:
    """psycopg's `prepare=`: None lets it prepare the statement as usual, False plans this call alone."""
    return None if len(outcomes) <= PREPARED_PLAN_MAX_OUTCOMES else False


def _array_literal(numbers: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers, for a parameter the statement casts (`%s::bigint[]`):
    psycopg adapts a list element by element in Python, a fifth of the worker's time in a drain."""
    return "{" + ",".join(map(repr, numbers)) + "}"


def _seconds_literal(seconds: Iterable[float]) -> str:
    """Like _array_literal, to the microsecond: repr() of a float costs three times as much."""
    return "{" + ",".join(["%.6f" % x for x in seconds]) + "}"


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters of text that may come from a job or the database, for a log line."""
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more]"


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__
