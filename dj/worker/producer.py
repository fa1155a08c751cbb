"""The producer: the worker's main loop. Each cycle records the finished attempts and claims more
jobs in one round trip, and hands the claimed jobs to the executor.

River splits this into a producer (claims) and a completer (records outcomes). Here they are one
cycle on purpose: the claim and the outcomes share one transaction, so one WAL flush (a commit)
per cycle, which is what makes a drain fast. So there is no separate completer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psycopg

from .. import dependencies, sql, tracing
from .. import task as task_mod
from ..cursors import ClaimCursors
from .connection import reconnect_delay
from .executor import MAX_ASYNC_BUFFER
from .jobs import (MAX_ERROR_CHARS, Claimed, Counts, Outcome, _array_literal, _clip, _first_line, _load_job_json,
                   _seconds_literal, log, retry_delay)

if TYPE_CHECKING:
    from . import Worker

BUFFER_SECONDS = 0.02
# The cap binds only for jobs under 0.15 ms. Each claim-and-finish cycle pays a commit (a WAL
# flush), so bigger batches drain faster: with 8 threads, 32 -> 65k jobs/s, 64 -> 85k, 128 -> 97k
# on 2 processes (256 gains nothing more).
MAX_PREFETCH_PER_THREAD = 128

# PostgreSQL's generic plan for COMPLETE and FAIL cannot know how long the outcome arrays are, and
# joins them to the jobs in a nested loop: quadratic, 50 us a job at 500 outcomes against 5 us with
# a plan made for the actual arrays (a hash join). Planning costs about 0.4 ms, so small flushes
# keep the prepared statement and large ones are planned afresh.
PREPARED_PLAN_MAX_OUTCOMES = 32

# How long after a rate window frees a slot the worker claims again (sql.RATE_WAIT): the server's
# clock and the worker's monotonic one agree only to within a round trip.
RATE_WAKE_SLACK = 0.005
# How many keys of per-key limits a claim looks at per queue (sql.LOCK_KEYS): enough for every key
# of a usual workload in each claim, and a bound on the claim's cost and advisory locks when there
# are thousands. Past it, successive claims go round the keys, starting after the last one seen.
KEYS_PER_CLAIM = 50


def _prepare(outcomes: list[Outcome]) -> bool | None:
    """psycopg's `prepare=`: None lets it prepare the statement as usual, False plans this call alone."""
    return None if len(outcomes) <= PREPARED_PLAN_MAX_OUTCOMES else False


class Producer:
    def __init__(self, worker: "Worker"):
        w = self.worker = worker
        self.name = w.name
        self.queues = w.queues
        self.connector = w._connector
        self.executor = w._executor
        self.async_executor = w._async_executor
        self._registry_size = -1
        self._async_tasks: set[str] = set()  # names of the registered coroutine tasks
        self._async_until = 0.0  # async slots count in the room until then (see resize_buffer)
        self.counts = w.counts
        self._held = w._held
        self._results = w._results
        self._wake = w._wake
        self._stopping = w._stopping
        self.conn: psycopg.Connection | None = None  # the main connection, opened by Worker.run
        self.more_ready = True
        # Where each queue's next claim starts reading (dj/cursors.py): after this worker's last
        # claimed job, so that it does not re-read the dead index entries an old snapshot keeps.
        self.cursors = ClaimCursors(self.queues, w.min_priority)
        self._claim_head, self._claim_started = False, 0.0  # the claim in flight: from a head? since?
        # Per-key limits: whether a registered task has one (only then does a claim look for keys),
        # where the next claim's walk over the keys starts, and the walk in flight.
        self._keyed = False
        self.key_cursor: str | None = None
        self._keys_cur: psycopg.Cursor | None = None
        self.paused: set[str] = set()
        # Rate limits (dj/rates.py): whether one of our queues has one (the last claim's lock said
        # so), the tasks with @job(rate=...) we know (as CLAIM_RATED_TASKS' parameters), and when a
        # used-up key frees a slot while its jobs wait (monotonic; None: no such key).
        self.rated_queues = False
        self.rate_wake_at: float | None = None
        self._rated: dict[str, list[Any]] = {"rated_tasks": [], "rated_max": [], "rated_period": []}
        self._rated_size = -1
        self._lock_cur: psycopg.Cursor | None = None
        self._rate_cur: psycopg.Cursor | None = None
        self.poll_interval = w.poll_interval
        self.flush_interval = 0.005
        # Jobs claimed ahead of free threads, so that one claim round trip serves many jobs. By
        # default the buffer adapts to how long jobs take: about BUFFER_SECONDS of work, at least
        # one job per thread, so quick jobs are claimed hundreds at a time while slow ones are
        # never hoarded away from other workers. Unstarted jobs are handed back on shutdown.
        self.concurrency = w.concurrency
        self.fixed_prefetch = w.fixed_prefetch
        self.capacity = w.concurrency + (w.concurrency if w.fixed_prefetch is None else w.fixed_prefetch)
        self.slots = w.concurrency
        self.executor.flush_at = self.async_executor.flush_at = self.capacity // 2
        self.summary_interval = w.summary_interval
        self._summary_at = time.monotonic() + w.summary_interval
        self._summarised = Counts()

    # --- the loop ---------------------------------------------------------------------------------

    def on_jobs(self) -> None:
        """The notifier's call: ready jobs may be waiting in our queues."""
        self.more_ready = True
        self._wake.set()

    def loop(self, burst: bool) -> None:
        executor, stopping, wake = self.executor, self._stopping, self._wake
        failures = 0
        epoch: int | None = self.connector.epoch  # see Connector.lost
        while not stopping.is_set():
            if self.rate_wake_at is not None and time.monotonic() >= self.rate_wake_at:
                # A rate-limited key frees a slot now. Read from the head: a task's held jobs may
                # sit before where our last claim stopped (the claim skipped them).
                self.rate_wake_at = None
                self.more_ready = True
                self.cursors.rescan()
            try:
                executor.enforce_timeouts()
                if self.paused:
                    self.hand_back_paused()
                if executor.all_stuck():
                    return
                claimed = self.cycle()
                self.maybe_summarise()
                failures = 0
                if (burst and not claimed and not self._held and not self._results and not self.more_ready
                        and self.rate_wake_at is None):  # else rate-held jobs remain: wait for their slot
                    # Nothing to run now. A job waiting in our queues for a job that is ready or
                    # running (any queue, any worker) can still be released: then wait for the
                    # NOTIFY of its release (or the poll interval), as an idle worker does.
                    # Likewise a job held back by its key's limit, once its key's running job ends.
                    if not dependencies.releasable(self.conn, self.queues) and not self.keyed_waiting():
                        return
            except psycopg.OperationalError as exc:
                self.connector.lost(exc, epoch)
                stopping.wait(reconnect_delay(failures))
                failures += 1
                epoch = self.reconnect()
                continue
            if claimed and self.more_ready and self.room() >= self.capacity // 2:
                continue
            wake.wait(self.next_wait())
            if not wake.is_set() and not self._results:
                # The poll interval ran out: look again even without NOTIFY, from the position. A
                # job a missed NOTIFY put before it is the probe's to find (dj/cursors.py).
                self.more_ready = True
            wake.clear()

    def keyed_waiting(self) -> bool:
        """Before a burst worker exits: is a job with a per-key limit ready in its queues? Then it
        can run once its key's running job (here or on another worker) finishes, whose completion
        NOTIFYs this queue (sql.COMPLETE): so the worker waits for that, or its poll interval, and
        claims again, instead of exiting. It does not spin: one claim per wake-up."""
        if not self._keyed:
            return False
        w = self.worker
        row = self.conn.execute(sql.KEYED_WAITING, {"queues": self.queues, "min_priority": w.min_priority,
                                                    "max_priority": w.max_priority}).fetchone()
        return bool(row and row[0])

    def next_wait(self) -> float:
        if self._results:
            return self.flush_interval
        wait = self.executor.next_wait(self.poll_interval)
        if self.rate_wake_at is not None:
            wait = min(wait, max(0.001, self.rate_wake_at - time.monotonic()))
        return wait

    def reconnect(self) -> int | None:
        """Replace the main connection; returns its epoch (see Connector.lost), None if the database
        is still out of reach."""
        self.conn, epoch = self.connector.reconnect(self.conn, self.name, list(self._held))
        self.cursors.rescan()  # the reconnect handed back rows of a claim whose answer was lost
        return epoch

    # --- one cycle --------------------------------------------------------------------------------

    def resize_buffer(self) -> None:
        """Size the claim buffer (capacity: jobs held at most) and the slots (jobs run at once).

        A claim cannot choose sync or async jobs, so the room is one number. The async executor's
        slots and buffer count in it only while async jobs are about (one is held, or one was
        claimed in the last second): otherwise a worker whose queues hold only sync jobs would
        hoard `async_concurrency` more of them away from other workers."""
        ex = self.executor
        if self.fixed_prefetch is None:
            per_thread = min(MAX_PREFETCH_PER_THREAD, max(1, int(BUFFER_SECONDS / max(ex.avg_runtime, 1e-6))))
            capacity = self.concurrency * (1 + per_thread)
        else:
            capacity = self.concurrency + self.fixed_prefetch
        self.slots = self.concurrency
        ax = self.async_executor
        if ax.busy or self._async_until > time.monotonic():
            self.slots += ax.concurrency
            capacity += ax.concurrency + min(MAX_ASYNC_BUFFER, max(
                1, int(BUFFER_SECONDS * ax.concurrency / max(ax.avg_runtime, 1e-6))))
        self.capacity = capacity
        ex.flush_at = ax.flush_at = capacity // 2

    def room(self) -> int:
        # A timed-out job's thread stays busy until the function returns, so it still takes a slot.
        return self.capacity - len(self._held) - len(self.executor.abandoned)

    def cycle(self) -> int:
        """One round trip: record the finished attempts, and claim more jobs if there is room.

        Returns how many jobs were claimed.
        """
        outcomes: list[Outcome] = []
        results = self._results
        while results:
            outcomes.append(results.popleft())
        self.resize_buffer()
        room = self.room() + len(outcomes)
        idle = self.slots - (self.capacity - room)
        # Claim when a thread is idle or the buffer has drained to the refill mark. Claiming one
        # job each time one finishes would cost a round trip per job.
        claim = self.more_ready and room > 0 and (idle > 0 or room >= self.capacity // 2)
        if claim:
            # Cleared before the round trip: a NOTIFY that arrives meanwhile sets it again and is
            # not lost when the claim's answer comes back.
            self.more_ready = False
        if not outcomes and not claim:
            return 0
        ok = [o for o in outcomes if o.error is None]
        bad = [o for o in outcomes if o.error is not None]
        conn = self.conn
        try:
            # One transaction, so one WAL flush, for the claim and the outcomes. The claim goes first:
            # the outcomes upsert job_stats rows that every worker shares, and their row locks are
            # held until commit, so the claim must not run while this worker holds them.
            with conn.pipeline(), conn.transaction():
                cur = self.claim(room) if claim else None
                woken = []  # queues with new work: batch callbacks, freed slots of limited queues
                kept = [o for o in ok if o.job.keep is not None]
                if kept:  # a statement of their own: COMPLETE stays as it is when nothing is kept
                    ok = [o for o in ok if o.job.keep is None]
                    woken.append(conn.execute(sql.COMPLETE_KEEP, {
                        "ids": _array_literal(o.job.id for o in kept),
                        "attempts": _array_literal(o.job.attempts for o in kept),
                        "seconds": _seconds_literal(o.seconds for o in kept), "results": [o.result for o in kept],
                        "errors": [o.result_error for o in kept], "worker": self.name},
                        prepare=_prepare(kept)))
                if ok:
                    woken.append(conn.execute(sql.COMPLETE, {
                        "ids": _array_literal(o.job.id for o in ok),
                        "attempts": _array_literal(o.job.attempts for o in ok),
                        "seconds": _seconds_literal(o.seconds for o in ok), "worker": self.name},
                        prepare=_prepare(ok)))
                if bad:
                    woken.append(conn.execute(sql.FAIL, {
                        "ids": [o.job.id for o in bad], "attempts": [o.job.attempts for o in bad],
                        "errors": [o.error[:MAX_ERROR_CHARS] for o in bad],
                        "delays": [retry_delay(o.job.attempts) for o in bad],
                        "dead": [o.dead for o in bad], "seconds": [o.seconds for o in bad], "worker": self.name},
                        prepare=_prepare(bad)))
        except BaseException:
            self._keys_cur = None
            results.extendleft(reversed(outcomes))  # record them after reconnecting
            raise
        if self._keys_cur is not None:
            row = self._keys_cur.fetchone()
            self.key_cursor = row[1] if row else None  # None: the walk reached the last key
            self._keys_cur = None
        self.count(outcomes)
        if tracing.ENABLED:
            tracing.finished(outcomes)
        for o in bad:
            if not o.dead:  # its retry waits in its queue; is that before where we read?
                self.cursors.failed(o.job.queue, o.job.priority)
        woke = any(queue in self.queues for c in woken for queue, _ in c.fetchall())
        if woke:
            self.cursors.rescan()  # a batch callback or a freed slot of a limited queue
        if cur is None:
            self.more_ready = self.more_ready or woke
            return 0
        self.read_rates()
        rows = cur.fetchall()
        if len(rows) == room or woke:
            self.more_ready = True
        rows.sort(key=lambda r: (r[8], r[9], r[0]))
        held = self._held
        jobs: list[Claimed] = []
        coroutines: list[Claimed] = []
        last = {}
        self._look_at_registry()
        async_tasks = self._async_tasks
        if not async_tasks:
            for r in rows:
                job = Claimed(r[0], r[1], _load_job_json(r[2]), _load_job_json(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], trace_context=r[10], keep=r[11])
                held[job.id] = job
                jobs.append(job)
                last[job.queue] = (job.priority, job.run_at, job.id)
        else:
            for r in rows:
                job = Claimed(r[0], r[1], _load_job_json(r[2]), _load_job_json(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], trace_context=r[10], keep=r[11])
                held[job.id] = job
                (coroutines if job.task in async_tasks else jobs).append(job)
                last[job.queue] = (job.priority, job.run_at, job.id)
        self.cursors.claimed(last, self._claim_head, time.monotonic() - self._claim_started)
        if jobs:
            self.executor.submit(jobs)
        if coroutines:
            self._async_until = time.monotonic() + 1.0
            self.async_executor.submit(coroutines)
        return len(rows)

    def _look_at_registry(self) -> None:
        if len(task_mod._registry) != self._registry_size:  # tasks registered since the last look
            self._registry_size = len(task_mod._registry)
            tasks = task_mod.registered().values()
            self._async_tasks = {t.name for t in tasks if t.is_async}
            self._keyed = any(t.options.limit_by is not None for t in tasks)

    def claim(self, room: int) -> psycopg.Cursor:
        w, conn = self.worker, self.conn
        self._lock_cur = conn.execute(sql.LOCK_LIMITED_QUEUES, {"queues": self.queues})
        rated = self.rated_tasks()
        if rated["rated_tasks"]:
            conn.execute(sql.LOCK_RATED_TASKS, rated)
        self._look_at_registry()
        if self._keyed:  # a worker that knows no task with a per-key limit could not run their jobs
            self._keys_cur = conn.execute(sql.LOCK_KEYS, {"queues": self.queues, "after_key": self.key_cursor,
                                                          "max_keys": KEYS_PER_CLAIM})
        after, self._claim_head = self.cursors.params()
        self._claim_started = time.monotonic()
        cur = conn.execute(sql.CLAIM_RATED_TASKS if rated["rated_tasks"] else sql.CLAIM, {
            "queues": self.queues, "min_priority": w.min_priority, "max_priority": w.max_priority,
            "limit": room, "worker": self.name, **after, **(rated if rated["rated_tasks"] else {})})
        self._rate_cur = None
        if rated["rated_tasks"] or self.rated_queues:
            self._rate_cur = conn.execute(sql.RATE_WAIT, {"queues": self.queues, **rated})
        return cur

    def rated_tasks(self) -> dict[str, list[Any]]:
        """The registered tasks with @job(rate=...), as the parameters of the rate statements."""
        registry = task_mod._registry
        if len(registry) != self._rated_size:
            self._rated_size = len(registry)
            rated = sorted((name, t.rate) for name, t in registry.items() if t.rate is not None)
            self._rated = {"rated_tasks": [n for n, _ in rated], "rated_max": [r.limit for _, r in rated],
                           "rated_period": [r.period for _, r in rated]}
        return self._rated

    def read_rates(self) -> None:
        """After a claim: note whether our queues have rate limits, and when a used-up one frees."""
        rated_queues = any(r[1] for r in self._lock_cur.fetchall()) if self._lock_cur is not None else False
        if self._rate_cur is not None:
            waits = [r[0] for r in self._rate_cur.fetchall()]
            # A little after the oldest start leaves the window, so the claim then finds it gone.
            self.rate_wake_at = time.monotonic() + max(0.0, min(waits)) + RATE_WAKE_SLACK if waits else None
        elif rated_queues:  # a rate limit we did not know of: claim again at once, this time with RATE_WAIT
            self.rate_wake_at = time.monotonic()
        self.rated_queues = rated_queues
        self._lock_cur = self._rate_cur = None

    def count(self, outcomes: list[Outcome]) -> None:
        counts, held = self.counts, self._held
        for o in outcomes:
            held.pop(o.job.id, None)
            if o.error is None:
                counts.succeeded += 1
            elif o.dead:
                counts.dead += 1
                log.warning("job %d (%s) is dead after attempt %d: %s", o.job.id, _clip(o.job.task, 200),
                            o.job.attempts, _clip(o.error.strip().splitlines()[-1] if o.error.strip() else "", 300))
            else:
                counts.failed += 1

    def flush(self) -> None:
        """Record finished attempts without claiming (used while shutting down)."""
        more, self.more_ready = self.more_ready, False
        try:
            self.cycle()
        finally:
            self.more_ready = more

    # --- handing jobs back ------------------------------------------------------------------------

    def hand_back_paused(self) -> None:
        """Give back the buffered, unstarted jobs of queues that were just paused; running ones finish."""
        paused, self.paused = self.paused, set()
        give = [*self.executor.take_unstarted(lambda job: job.queue in paused),
                *self.async_executor.take_unstarted(lambda job: job.queue in paused)]
        if give:
            log.info("queue(s) %s paused: handing back %d unstarted job(s)", ",".join(sorted(paused)), len(give))
            self.release(give)

    def release(self, jobs: list[Claimed]) -> None:
        if not jobs:
            return
        try:
            self.conn.execute(sql.RELEASE, release_params(jobs, self.name))
        except psycopg.Error as exc:
            log.warning("could not hand back %d job(s) (%s); they return after the lock timeout",
                        len(jobs), _first_line(exc))
        for j in jobs:
            self._held.pop(j.id, None)

    # --- the summary line -------------------------------------------------------------------------

    def maybe_summarise(self) -> None:
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


def release_params(jobs: list[Claimed], worker: str) -> dict[str, Any]:
    return {"ids": [j.id for j in jobs], "attempts": [j.attempts for j in jobs],
            "started": [j.started is not None for j in jobs], "worker": worker}
