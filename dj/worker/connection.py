"""The worker's connections: how they are opened, how an outage is told (one line when it starts,
one when it ends, whatever the number of threads that notice), and the main connection's
replacement after an outage."""

from __future__ import annotations

import random
import threading
import time

import psycopg

from .. import pooler, sql
from ..config import mask_secrets
from .jobs import _clip, _first_line, log


def reconnect_delay(failures: int, cap: float = 30.0) -> float:
    """Capped exponential backoff between reconnection attempts: 0.5 s, 1 s, 2 s ... up to `cap`,
    each within +-20% so that the workers of a restarted server do not all knock at once."""
    return min(cap, 0.5 * 2 ** min(failures, 16)) * random.uniform(0.8, 1.2)


class Connector:
    """Opens the worker's connections and keeps the outage epoch.

    Outages: the first thread whose connection fails logs one line; a connection opened in an
    earlier epoch fails silently, since its outage was logged already."""

    def __init__(self, url: str, lock_timeout: float):
        self.url = url
        # Every connection of the worker gives up on a silent peer (a cut cable, a frozen server)
        # within about half the lock timeout (2 to 30 s), instead of the kernel's 15 minutes.
        dead_after = min(30.0, max(2.0, lock_timeout / 2))
        self.tcp_options = {"keepalives": 1, "keepalives_idle": max(1, int(dead_after / 2)),
                            "keepalives_interval": max(1, int(dead_after / 6)), "keepalives_count": 3,
                            "tcp_user_timeout": int(dead_after * 1000)}
        self.connect_timeout = max(2, int(min(dead_after, 10)))
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None
        self.epoch = 0

    def connect(self, url: str | None = None) -> psycopg.Connection:
        """An autocommit connection to the database, or to `url` (DJ_LISTEN_URL). Behind a pooler it
        prepares no statements (dj.pooler.adapt)."""
        url = url or self.url
        conn = psycopg.connect(url, autocommit=True, connect_timeout=self.connect_timeout, **self.tcp_options)
        try:
            return pooler.adapt(conn, url)
        except BaseException:
            conn.close()
            raise

    def reconnect(self, old: psycopg.Connection | None, worker: str,
                  held: list[int]) -> tuple[psycopg.Connection, int | None]:
        """Replace the main connection `old`: returns the new one and its epoch (see lost), or a
        _ClosedConnection and None if the database is still out of reach."""
        if old is not None:
            old.close()
        since, conn = self.epoch, None
        try:
            conn = self.connect()
            # The answer to our last claim may have been lost with the connection.
            conn.execute(sql.RELEASE_UNKNOWN, {"worker": worker, "held": held})
        except psycopg.OperationalError as exc:
            if conn is not None:
                conn.close()
            self.lost(exc, since)
            return _ClosedConnection(), None
        return conn, self.back(since)

    def lost(self, exc: BaseException, epoch: int | None) -> None:
        """A database call failed on a connection that last worked in `epoch` (None: a stand-in
        for a connection that could not be opened). The first failure of an outage logs one line;
        the failures of older connections and every retry stay quiet, so an outage is one line, not
        a stream of them. The epoch moves on when an outage starts and when it ends."""
        with self._outage_lock:
            if self._outage_since is None and epoch == self.epoch:
                self._outage_since = time.monotonic()
                self.epoch += 1
                log.warning("database connection lost (%s); reconnecting with backoff",
                            _clip(mask_secrets(_first_line(exc), self.url), 300))
            else:
                log.debug("database still out of reach (%s)", _clip(mask_secrets(_first_line(exc), self.url), 300))

    def back(self, since: int) -> int:
        """A call that began in epoch `since` worked: if an outage was noticed before it began, the
        outage is over (logged once). Returns the epoch the connection now belongs to."""
        with self._outage_lock:
            if self._outage_since is not None and since == self.epoch:
                log.info("database connection restored after %.1fs", time.monotonic() - self._outage_since)
                self._outage_since = None
                self.epoch += 1
                return self.epoch
            return since


class _ClosedConnection:
    """Stands in for a connection while the database is unreachable; every use raises."""

    closed = True

    def execute(self, *a, **k):
        raise psycopg.OperationalError("not connected")

    def pipeline(self):
        raise psycopg.OperationalError("not connected")

    def close(self):
        pass
