"""The notifier: a thread that LISTENs on its own connection and wakes the main loop when a job is
enqueued on one of the worker's queues (`sql.NOTIFY_CHANNEL`), or when a queue's settings change
(`sql.QUEUE_SETTINGS_CHANNEL`: a pause hands back the buffered jobs of that queue)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from .. import sql
from ..cursors import ClaimCursors
from .connection import Connector, reconnect_delay


class Notifier:
    def __init__(self, connector: Connector, queues: list[str], stopping: threading.Event,
                 on_jobs: Callable[[], None], on_settings: Callable[[str], None],
                 cursors: ClaimCursors | None = None):
        self.connector = connector
        self.queues = queues
        # Reads a jobs NOTIFY's payload: is it for our queues, and where does its job sit?
        self.cursors = cursors or ClaimCursors(queues)
        self.stopping = stopping
        self.on_jobs = on_jobs  # ready jobs may be waiting (a NOTIFY, or back from an outage)
        self.on_settings = on_settings  # a queue's settings changed; the payload is JSON

    def run(self) -> None:
        connector, stopping = self.connector, self.stopping
        failures = 0
        while not stopping.is_set():
            epoch = connector.epoch
            try:
                with connector.connect() as conn:
                    conn.execute("LISTEN " + sql.NOTIFY_CHANNEL)
                    conn.execute("LISTEN " + sql.QUEUE_SETTINGS_CHANNEL)
                    epoch, failures = connector.back(epoch), 0
                    self.cursors.rescan()  # we may have missed notifications while away
                    self.on_jobs()
                    while not stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if note.channel == sql.QUEUE_SETTINGS_CHANNEL:
                                self.on_settings(note.payload)
                            elif self.cursors.woken(note.payload):
                                self.on_jobs()
            except psycopg.Error as exc:
                connector.lost(exc, epoch)
                stopping.wait(reconnect_delay(failures))
                failures += 1
