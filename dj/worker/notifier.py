"""The notifier: a thread on its own connection that wakes the main loop when a job is enqueued on
one of the worker's queues, or when a queue's settings change (a pause hands back the buffered jobs
of that queue). It works one of two ways, chosen at start (`dj.pooler.listen_target`):

- LISTEN (`sql.NOTIFY_CHANNEL`, `sql.QUEUE_SETTINGS_CHANNEL`), on the database URL, or on
  DJ_LISTEN_URL when the database URL goes through a transaction pooler: wakes within milliseconds;
- polling, behind a transaction pooler without DJ_LISTEN_URL, where no NOTIFY can reach an idle
  client: `sql.POLL`, one read of the claim index per queue, every poll interval (0.1 s by
  default), so an idle worker finds a new job within about that time. It tells the claim cursors
  where the first ready job sits, as an enqueue's NOTIFY would. It reads from the head of each
  queue, which makes each poll also the cursors' probe (dj/cursors.py), while that is cheap; once
  a read from the head takes the server more than POLL_SLOW (an old snapshot: every job drained
  since leaves index entries at the head that each read visits), it reads from the worker's claim
  positions instead, and leaves the reads from the head to the probe on the maintenance thread,
  which stretches its interval by their cost. Without that, the interval stretched: pickup took
  up to 20 x the slow read (seconds)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .. import sql
from ..cursors import SEPARATOR, ClaimCursors
from .connection import Connector, reconnect_delay

# A poll that the server takes long over (an old snapshot keeps dead entries at the head of the
# claim index, see sql.CLAIM) waits this many times the server's time before the next, so that
# polling never takes more than a few percent of a server process. Below POLL_SLOW it waits the
# plain interval: stretching by the round trip's time instead made the interval 0.2-0.5 s on a
# loaded machine, where a round trip is mostly a wait for a CPU (p99 pickup 430 ms).
POLL_COST_FACTOR = 20.0
POLL_SLOW = 0.02


class Notifier:
    def __init__(self, connector: Connector, queues: list[str], stopping: threading.Event,
                 on_jobs: Callable[[], None], on_settings: Callable[[str], None],
                 cursors: ClaimCursors | None = None, poll_params: dict[str, Any] | None = None):
        self.connector = connector
        self.queues = queues
        # Reads a jobs NOTIFY's payload: is it for our queues, and where does its job sit?
        self.cursors = cursors or ClaimCursors(queues)
        self.stopping = stopping
        self.on_jobs = on_jobs  # ready jobs may be waiting (a NOTIFY, or back from an outage)
        self.on_settings = on_settings  # a queue's settings changed; the payload is JSON
        # Set by Worker.run before the thread starts: where to LISTEN, or None to poll.
        self.listen_url: str | None = None
        self.poll_interval = 0.1
        self.poll_params = {"queues": queues, **(poll_params or {})}

    def run(self) -> None:
        connector, stopping = self.connector, self.stopping
        failures = 0
        while not stopping.is_set():
            epoch = connector.epoch
            try:
                with connector.connect(self.listen_url) as conn:
                    if self.listen_url is not None:
                        conn.execute("LISTEN " + sql.NOTIFY_CHANNEL)
                        conn.execute("LISTEN " + sql.QUEUE_SETTINGS_CHANNEL)
                    epoch, failures = connector.back(epoch), 0
                    self.cursors.rescan()  # we may have missed notifications while away
                    self.on_jobs()
                    if self.listen_url is not None:
                        self._listen(conn)
                    else:
                        self._poll(conn)
            except psycopg.Error as exc:
                connector.lost(exc, epoch)
                stopping.wait(reconnect_delay(failures))
                failures += 1

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self.stopping.is_set():
            for note in conn.notifies(timeout=1.0):
                if note.channel == sql.QUEUE_SETTINGS_CHANNEL:
                    self.on_settings(note.payload)
                elif self.cursors.woken(note.payload):
                    self.on_jobs()

    def _poll(self, conn: psycopg.Connection) -> None:
        paused: set[str] = set()
        wait = self.poll_interval
        cursors = self.cursors
        while not self.stopping.wait(wait):
            started = time.monotonic()
            from_head = cursors.head_is_cheap(POLL_SLOW)
            rows = conn.execute(sql.POLL, {**self.poll_params,
                                           **(cursors.head() if from_head else cursors.positions())}).fetchall()
            took = max((float(r[5]) for r in rows), default=0.0)  # the server's time
            if from_head:
                cursors.probed({r[0]: (r[2], r[3], r[4]) for r in rows if r[4] is not None}, took)
            # A slow read from the head is followed by reads from the positions: no need to wait.
            slow = took > POLL_SLOW and not from_head
            # Polls start every interval, however long the round trip took (a wait of a whole
            # interval after each poll made the period interval + round trip, the tail of the pickup
            # latency longer by as much).
            wait = (max(self.poll_interval, POLL_COST_FACTOR * took) if slow
                    else max(0.0, self.poll_interval - (time.monotonic() - started)))
            now_paused = {r[0] for r in rows if r[1]}
            for queue in sorted(now_paused - paused):  # what the settings NOTIFY would have said
                self.on_settings(json.dumps({"queue": queue, "paused": True}))
            paused = now_paused
            woken = False
            for queue, _, priority, micros, job_id, _ in rows:
                if job_id is not None:  # what an enqueue's NOTIFY would have said (sql._WAKE_AT)
                    woken |= self.cursors.woken(SEPARATOR.join((queue, str(priority), str(micros), str(job_id))))
            if woken:
                self.on_jobs()
