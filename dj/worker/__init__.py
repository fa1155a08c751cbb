"""The worker: claims jobs in batches, runs them, and records their outcomes.

One worker process is a few parts, each in a module of its own:
- `producer`: the main loop; each cycle records finished attempts and claims more jobs in one
  round trip (one transaction), and hands the claimed jobs to the executor;
- `executor`: runs the jobs: sync jobs on `concurrency` runner threads (and their timeouts),
  coroutine jobs on an event loop of the worker's own, up to `async_concurrency` at once;
- `notifier`: a thread on its own connection that wakes the main loop on enqueue: LISTEN, or,
  behind a transaction pooler without DJ_LISTEN_URL, a poll of the claim index;
- `maintenance`: the heartbeat thread on its own connection, which also reclaims the jobs of dead
  workers, forgets stale ones, prunes stats and fires cron ticks;
- `connection`: opening and replacing connections, and telling an outage once;
- `jobs`: what the parts pass between them (Claimed, Outcome, Counts) and small helpers.
This module wires them together and owns the lifecycle: run(), stop(), signals and shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import deque
import psycopg

from .. import config, db, pooler, sql
from ..errors import WorkerStuck
from ..task import PRIORITY_MAX, PRIORITY_MIN, load_task_modules
from .connection import Connector, reconnect_delay
from .executor import AsyncExecutor, ThreadExecutor
from .jobs import Claimed, Counts, Outcome, _first_line, log, retry_delay
from .maintenance import Maintenance
from .notifier import Notifier
from .producer import Producer, release_params

__all__ = ["Worker", "Counts", "Claimed", "Outcome", "retry_delay", "reconnect_delay", "_first_line"]

DEFAULT_LOCK_TIMEOUT = 300.0
# Idle polls: where NOTIFY wakes the worker, a claim every 5 s is only the fallback. Behind a
# transaction pooler without DJ_LISTEN_URL the poll is the wake-up: a read of the claim index
# (sql.POLL) every 0.1 s, so a job waits up to ~0.1 s for an idle worker, for 10 cheap queries a
# second per worker process (see the README, "Running behind PgBouncer").
POLL_INTERVAL = 5.0
POOLED_POLL_INTERVAL = 0.1


class Worker:
    def __init__(
        self,
        queues: list[str] | tuple[str, ...] = ("default",),
        concurrency: int = 8,
        *,
        min_priority: int | None = None,
        max_priority: int | None = None,
        database_url: str | None = None,
        listen_url: str | None = None,
        poll_interval: float | None = None,
        prefetch: int | None = None,
        lock_timeout: float | None = None,
        heartbeat_interval: float = 5.0,
        shutdown_timeout: float = 25.0,
        default_timeout: float | None = None,
        name: str | None = None,
        parent_pid: int | None = None,
        log_jobs: bool = False,
        summary_interval: float = 30.0,
        snapshot_warn_after: float | None = None,
        async_concurrency: int = 100,
    ):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if async_concurrency < 1:
            raise ValueError("async_concurrency must be at least 1")
        self.queues = list(dict.fromkeys(queues)) or ["default"]
        self.concurrency = concurrency
        self.async_concurrency = async_concurrency
        self.min_priority = PRIORITY_MIN if min_priority is None else min_priority
        self.max_priority = PRIORITY_MAX if max_priority is None else max_priority
        if self.min_priority > self.max_priority:
            raise ValueError("min_priority is greater than max_priority")
        self.log_jobs = log_jobs
        self.summary_interval = summary_interval
        self.url = database_url or db.database_url()
        self.listen_url = listen_url or config.listen_url()  # DJ_LISTEN_URL (see dj/pooler.py)
        self.poll_interval = poll_interval
        self.fixed_prefetch = prefetch
        self.lock_timeout = float(lock_timeout or os.environ.get("DJ_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
        self.heartbeat_interval = min(heartbeat_interval, self.lock_timeout / 3)
        self.shutdown_timeout = shutdown_timeout
        self.default_timeout = default_timeout
        self.host = socket.gethostname()
        self.name = name or f"{self.host}:{os.getpid()}"
        self.parent_pid = parent_pid
        self.counts = Counts()
        # Log one warning when a snapshot this old (seconds) holds back vacuum of jobs; None:
        # DJ_SNAPSHOT_WARN_AFTER, else 60.
        self.snapshot_warn_after = snapshot_warn_after

        # What the parts share: the jobs this worker holds (claimed, not yet recorded), the
        # outcomes waiting to be recorded, and the events that wake and stop the main loop.
        self._held: dict[int, Claimed] = {}
        self._results: deque[Outcome] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._signals = 0

        self._connector = Connector(self.url, self.lock_timeout)
        self._executor = ThreadExecutor(self)
        self._async_executor = AsyncExecutor(self)  # its loop starts with the first async job
        self._producer = Producer(self)
        self._notifier = Notifier(self._connector, self.queues, self._stopping,
                                  on_jobs=self._producer.on_jobs, on_settings=self._on_settings,
                                  cursors=self._producer.cursors,
                                  poll_params={"min_priority": self.min_priority, "max_priority": self.max_priority})
        self._maintenance = Maintenance(self)

    # --- public ---------------------------------------------------------------------------------

    def run(self, burst: bool = False) -> Counts:
        """Work until stopped (SIGTERM/SIGINT or stop()), or with burst=True until no ready job is left."""
        load_task_modules()
        self._install_signal_handlers()
        wake = self._choose_wake_up()
        self._producer.conn = db.connect(self.url, autocommit=True, **self._connector.tcp_options)
        db.ensure_schema(self._conn)
        self._register()
        self._executor.start()
        self._spawn(self._notifier.run, "dj-listener")
        self._spawn(self._maintenance.run, "dj-heartbeat")
        log.info("worker %s started: queues=%s concurrency=%d; wake-up: %s", self.name, ",".join(self.queues),
                 self.concurrency, wake)
        try:
            self._producer.loop(burst)
        finally:
            self._shutdown()
        if self._executor.stuck:
            raise WorkerStuck(f"worker {self.name} stopped: all {self.concurrency} runner threads are stuck in "
                              "jobs far past their timeout")
        return self.counts

    def stop(self) -> None:
        """Claim nothing more, finish running jobs, hand back the rest, return from run()."""
        self._stopping.set()
        self._wake.set()

    # --- wiring ---------------------------------------------------------------------------------

    def _choose_wake_up(self) -> str:
        """LISTEN where it works, else poll (dj.pooler.listen_target; it raises DJError for a pooler
        in statement mode or a DJ_LISTEN_URL that cannot work). Returns it in words, for the log."""
        listen = pooler.listen_target(self.url, self.listen_url)
        self._notifier.listen_url = listen
        if listen is not None:
            self._producer.poll_interval = self.poll_interval or POLL_INTERVAL
            return "LISTEN" + (" on DJ_LISTEN_URL" if listen != self.url else "")
        self._notifier.poll_interval = self.poll_interval or POOLED_POLL_INTERVAL
        self._producer.poll_interval = max(POLL_INTERVAL, self._notifier.poll_interval)
        return (f"polls every {self._notifier.poll_interval:g}s (a transaction pooler in front and no "
                "DJ_LISTEN_URL)")

    @property
    def _conn(self) -> psycopg.Connection | None:
        """The main connection (the producer's): claims, outcomes, registration, hand-backs."""
        return self._producer.conn

    def _reconnect(self) -> int | None:
        return self._producer.reconnect()

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _on_settings(self, payload: str) -> None:
        try:
            change = json.loads(payload)
        except ValueError:
            return
        if change.get("paused") and change.get("queue") in self.queues:
            self._producer.paused.add(change["queue"])  # the main loop hands back its buffered jobs
            self._wake.set()

    def _register(self, conn: psycopg.Connection | None = None) -> None:
        conn = conn or self._conn
        conn.execute(sql.REGISTER_WORKER, {"name": self.name, "host": self.host, "pid": os.getpid(),
                                           "queues": self.queues, "concurrency": self.concurrency})
        if conn is self._conn:
            conn.execute(sql.CLEAR_OWN_LOCKS, (self.name,))

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
        producer = self._producer
        self._stopping.set()
        unstarted = self._executor.take_unstarted() + self._async_executor.take_unstarted()
        self._executor.stop()
        self._async_executor.stop()
        deadline = time.monotonic() + self.shutdown_timeout
        producer.release(unstarted)
        while time.monotonic() < deadline:
            try:
                producer.flush()
            except psycopg.OperationalError:
                producer.reconnect()
            if not self._held:
                break
            self._wake.wait(0.05)
            self._wake.clear()
        if self._held:
            log.warning("%d job(s) still running after %gs; handing them back", len(self._held),
                        self.shutdown_timeout)
            producer.release(list(self._held.values()))
        self._async_executor.close()  # cancels what still runs: it was handed back
        try:
            self._conn.execute(sql.UNREGISTER_WORKER, (self.name,))
        except psycopg.Error:
            pass
        self._conn.close()
        log.info("worker %s stopped: %d succeeded, %d failed, %d dead", self.name, self.counts.succeeded,
                 self.counts.failed, self.counts.dead)

    def _hand_back_everything_now(self) -> None:
        jobs = list(self._held.values())
        if not jobs:
            return
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as conn:
                conn.execute(sql.RELEASE, release_params(jobs, self.name))
                conn.execute(sql.UNREGISTER_WORKER, (self.name,))
        except psycopg.Error:
            pass
