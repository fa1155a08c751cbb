"""Workers prune kept successes (job_results) once their keep has run out, one worker at a time.

Each worker's maintenance thread calls `take` every PRUNE_CHECK_INTERVAL seconds: one statement
that takes the 'prune results' lease of the maintenance table if a kept row has expired and no
other worker holds it (the pattern of dj/vacuum.py: a lease on a row, not a session lock, so it
works behind a transaction pooler). The winner then `run`s on a connection of its own, in a thread,
deleting PRUNE_BATCH expired rows per transaction until none is left, so no lock is held for
longer than one small batch takes, and completions, which insert other rows, never wait on it.
"""

from __future__ import annotations

import logging
import time

import psycopg

from . import sql

log = logging.getLogger("dj.pruning")

PRUNE_CHECK_INTERVAL = 1.0
PRUNE_BATCH = 1000
# A worker that dies while pruning holds the chore this long; another can take it after.
PRUNE_LEASE_SECONDS = 300


def prepare(conn: psycopg.Connection) -> bool:
    """Make sure the chore's row exists; False if the schema predates job_results."""
    try:
        conn.execute(sql.ENSURE_PRUNE_ROW)
        conn.execute("SELECT FROM job_results LIMIT 0")
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return False
    return True


def take(conn: psycopg.Connection, worker: str) -> bool:
    """Take the chore if some kept row has expired and no other worker holds it."""
    return conn.execute(sql.TAKE_PRUNE_LEASE, {"worker": worker, "lease": PRUNE_LEASE_SECONDS}).fetchone() is not None


def run(conn: psycopg.Connection, worker: str, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
    """Delete the expired rows, `batch` at a time, each batch its own transaction (`conn` in autocommit
    mode), then hand the lease back. Returns (rows deleted, batches)."""
    started, deleted, batches = time.monotonic(), 0, 0
    try:
        while True:
            n = conn.execute(sql.PRUNE_RESULTS, {"batch": batch}).rowcount
            deleted, batches = deleted + n, batches + 1
            if n < batch or time.monotonic() - started > PRUNE_LEASE_SECONDS / 2:
                break
    except BaseException:
        try:
            conn.execute(sql.DROP_PRUNE_LEASE, {"worker": worker})
        except psycopg.Error:
            pass  # the lease runs out by itself
        raise
    conn.execute(sql.END_PRUNE_LEASE, {"worker": worker, "seconds": time.monotonic() - started})
    return deleted, batches


def maybe_prune(conn: psycopg.Connection, worker: str, *, batch: int = PRUNE_BATCH) -> tuple[int, int] | None:
    """`take` and, if it was this worker's turn, `run`: (rows deleted, batches), or None."""
    if not take(conn, worker):
        return None
    return run(conn, worker, batch=batch)
