"""Maintenance: the heartbeat thread and what rides on it. On its own connection, every heartbeat
interval: the worker's row in `workers` (re-registered if it was removed), and, every quarter lock
timeout, the reaper (jobs of workers that stopped heartbeating become ready again), forgetting
stale workers and pruning old stats; then the due cron ticks, each enqueued once across workers,
and a look at the oldest snapshot (one warning when it gets old, dj/snapshot.py). Every second,
whether jobs needs a vacuum that no other worker is doing (dj/vacuum.py), and whether expired kept
results need pruning (dj/pruning.py); the vacuum and the pruning run in threads of their own, so
the heartbeat never waits for them. And when it is due, the claim cursors' probe (dj/cursors.py):
a read of each queue from its head, here and not on the main connection, so that claims go on
while it runs."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import psycopg

from .. import cron, pruning, snapshot, sql, vacuum
from .connection import reconnect_delay
from .jobs import _first_line, log

if TYPE_CHECKING:
    from . import Worker


class Maintenance:
    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.connector = worker._connector
        self.snapshots = snapshot.SnapshotWarning(worker.snapshot_warn_after)
        self.vacuum_ready: bool | None = None  # None: not asked yet; False: a schema without it
        self.vacuuming: threading.Thread | None = None
        self.prune_ready: bool | None = None  # None: not asked yet; False: a schema without job_results
        self.pruning: threading.Thread | None = None
        self._prune_at = 0.0

    def run(self) -> None:
        w, connector = self.worker, self.connector
        conn: psycopg.Connection | None = None
        epoch: int | None = None
        failures = 0
        last_reap = 0.0
        beat_at = 0.0  # the next heartbeat, on the monotonic clock
        tick = min(w.heartbeat_interval, vacuum.VACUUM_CHECK_INTERVAL)
        # While disconnected, retry with backoff, but at least once per heartbeat interval: the
        # heartbeat is what keeps our jobs from being handed to other workers.
        while not w._stopping.wait(tick if conn else min(w.heartbeat_interval, reconnect_delay(failures))):
            if w.parent_pid is not None and os.getppid() != w.parent_pid:
                log.warning("supervisor %d is gone; stopping", w.parent_pid)
                w.stop()
                return
            since = connector.epoch
            try:
                if conn is None or conn.closed:
                    epoch = since
                    conn = connector.connect()
                    beat_at = 0.0
                if time.monotonic() >= beat_at:
                    beat_at = time.monotonic() + w.heartbeat_interval
                    running = sum(1 for j in list(w._held.values()) if j.started is not None)
                    if conn.execute(sql.HEARTBEAT, (running, w.name)).rowcount == 0:
                        w._register(conn)  # our row was removed while we were away
                    epoch, failures = connector.back(since), 0
                    if time.monotonic() - last_reap > w.lock_timeout / 4:
                        last_reap = time.monotonic()
                        self.reap(conn)
                    cron.fire_due(conn)  # enqueue due cron ticks, each once across all workers
                    self.snapshots.check(conn)
                self.maybe_vacuum(conn)
                self.maybe_probe(conn)
                self.maybe_prune(conn)
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.OperationalError):
                    connector.lost(exc, epoch)
                    failures += 1
                else:
                    log.warning("heartbeat failed (%s); retrying", _first_line(exc))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def reap(self, conn: psycopg.Connection) -> None:
        params = {"lock_timeout": self.worker.lock_timeout}
        reaped = conn.execute(sql.REAP_ORPHANS, params).fetchall()
        if reaped:  # rows without an id: queues of batch callbacks that dead dependents enqueued
            log.warning("reclaimed %d job(s) from workers that stopped heartbeating",
                        sum(1 for job_id, _ in reaped if job_id is not None))
            for queue in sorted({q for _, q in reaped}):
                conn.execute(sql.NOTIFY, (queue,))
        conn.execute(sql.FORGET_STALE_WORKERS, params)
        conn.execute(sql.PRUNE_STATS)
        conn.execute(sql.PRUNE_RATE_STARTS)

    def maybe_probe(self, conn: psycopg.Connection) -> None:
        """Read each queue from its head, if the cursors' probe is due, and wake the main loop if a
        job is ready (dj/cursors.py says why here)."""
        w = self.worker
        cursors = w._producer.cursors
        if not cursors.probe_due():
            return
        rows = conn.execute(sql.POLL, {"queues": cursors.queues, "min_priority": w.min_priority,
                                       "max_priority": w.max_priority, **cursors.head()}).fetchall()
        took = max((float(r[5]) for r in rows), default=0.0)  # the server's time
        if cursors.probed({r[0]: (r[2], r[3], r[4]) for r in rows if r[4] is not None}, took):
            w._producer.on_jobs()

    def maybe_vacuum(self, conn: psycopg.Connection) -> None:
        """Vacuum jobs if it is due and no other worker is at it (dj/vacuum.py)."""
        w = self.worker
        if self.vacuum_ready is None:
            self.vacuum_ready = vacuum.prepare(conn)
        if not self.vacuum_ready or (self.vacuuming is not None and self.vacuuming.is_alive()):
            return
        dead = vacuum.take(conn, w.name)
        if dead is None:
            return
        self.vacuuming = threading.Thread(target=self._vacuum, args=(dead,), name="dj-vacuum", daemon=True)
        self.vacuuming.start()

    def maybe_prune(self, conn: psycopg.Connection) -> None:
        """Prune expired kept results if some are due and no other worker is at it (dj/pruning.py)."""
        now = time.monotonic()
        if now < self._prune_at:
            return
        self._prune_at = now + pruning.PRUNE_CHECK_INTERVAL
        if self.prune_ready is None:
            self.prune_ready = pruning.prepare(conn)
        if not self.prune_ready or (self.pruning is not None and self.pruning.is_alive()):
            return
        if not pruning.take(conn, self.worker.name):
            return
        self.pruning = threading.Thread(target=self._prune, name="dj-prune", daemon=True)
        self.pruning.start()

    def _prune(self) -> None:
        name = self.worker.name
        try:
            with self.connector.connect() as conn:
                deleted, batches = pruning.run(conn, name)
        except psycopg.Error as exc:  # the lease was handed back, or runs out; another worker tries
            log.warning("pruning of kept results failed (%s)", _first_line(exc))
            return
        log.debug("pruned %d expired result(s) in %d batch(es)", deleted, batches,
                  extra={"event": "prune", "deleted": deleted, "batches": batches})

    def _vacuum(self, dead: int) -> None:
        name = self.worker.name
        try:
            with self.connector.connect() as conn:
                seconds = vacuum.run(conn, name)
        except psycopg.Error as exc:  # the lease was handed back, or runs out; another worker tries
            log.warning("vacuum of jobs failed (%s)", _first_line(exc))
            return
        log.debug("vacuumed jobs in %.2fs (%d dead rows before)", seconds, dead,
                  extra={"event": "vacuum", "seconds": round(seconds, 3), "dead_before": dead})
