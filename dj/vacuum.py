"""Workers vacuum `jobs` themselves, one at a time, when dead rows pile up.

Why: every job leaves two dead row versions (its claim's update and its success's delete) and a
dead entry in each index. Autovacuum comes once per `autovacuum_naptime` (one minute on a stock
server; dj's embedded server naps 1 s), or never where it is off. At tens of thousands of jobs a
second, a minute of dead rows made the heap grow 30-fold and each claim walk more dead index
entries at the head of the queue: a 1M-job soak on a stock PostgreSQL 15 fell to a third of its
first round's rate. A user of a managed server cannot change the nap, but dj's own processes may
do the work. See docs/ARCHITECTURE.md for the measurements behind the thresholds.

Each worker's maintenance thread calls `take` about once a second and, when it is its turn, `run`
on a connection of its own in a short-lived thread (a vacuum can take seconds, and the heartbeat
must not wait). The statements, and why they elect one worker without session state, are in
`dj/sql.py`.
"""

from __future__ import annotations

import logging
import time

import psycopg

from . import sql

log = logging.getLogger("dj.vacuum")

# Vacuum once this many dead rows have piled up since the last run, plus VACUUM_SCALE x the live
# rows (so a big backlog is not rescanned for a few dead rows). Measured on a 1M-job soak: see
# docs/ARCHITECTURE.md.
VACUUM_MIN_DEAD = 100_000
VACUUM_SCALE = 0.2
# How often a worker asks whether a vacuum is due (a look at pg_stat_user_tables and one row).
VACUUM_CHECK_INTERVAL = 1.0
# A worker that dies while vacuuming holds the chore this long; another can take it after.
VACUUM_LEASE_SECONDS = 600


def prepare(conn: psycopg.Connection) -> bool:
    """Make sure the chore's row exists (a worker calls this once as it starts). False if the
    schema predates the maintenance table: such a worker never vacuums."""
    try:
        conn.execute(sql.ENSURE_VACUUM_ROW)
    except psycopg.errors.UndefinedTable:
        return False
    return True


def take(conn: psycopg.Connection, worker: str, *, min_dead: int = VACUUM_MIN_DEAD,
         scale: float = VACUUM_SCALE) -> int | None:
    """Take the chore if it is due and free: returns pg_stat's dead rows of jobs, or None when it is
    not this worker's turn (not due, someone else has it, or a schema without the table)."""
    try:
        row = conn.execute(sql.TAKE_VACUUM_LEASE, {"worker": worker, "lease": VACUUM_LEASE_SECONDS,
                                                   "min_dead": min_dead, "scale": scale}).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if row is None else row[0]


def run(conn: psycopg.Connection, worker: str) -> float:
    """Vacuum jobs under the lease `take` gave `worker`, then hand the lease back; returns the
    seconds it took. `conn` must be in autocommit mode: VACUUM cannot run in a transaction block."""
    started = time.monotonic()
    try:
        conn.execute(sql.VACUUM_JOBS)
    except BaseException:
        try:
            conn.execute(sql.DROP_VACUUM_LEASE, {"worker": worker})
        except psycopg.Error:
            pass  # the lease runs out by itself
        raise
    seconds = time.monotonic() - started
    conn.execute(sql.END_VACUUM_LEASE, {"worker": worker, "seconds": seconds})
    return seconds


def maybe_vacuum(conn: psycopg.Connection, worker: str, *, min_dead: int = VACUUM_MIN_DEAD,
                 scale: float = VACUUM_SCALE) -> float | None:
    """`take` and, if it was this worker's turn, `run` on the same connection: the seconds it took,
    or None."""
    dead = take(conn, worker, min_dead=min_dead, scale=scale)
    if dead is None:
        return None
    seconds = run(conn, worker)
    log.debug("vacuumed jobs in %.2fs (%d dead rows before)", seconds, dead)
    return seconds


def dead_rows(conn: psycopg.Connection) -> dict:
    """What pg_stat says of jobs: live and dead rows, sizes, and the last vacuums (for doctor)."""
    row = conn.execute("""
        SELECT n_live_tup, n_dead_tup, pg_table_size('jobs'), pg_indexes_size('jobs'),
               extract(epoch FROM now() - greatest(last_vacuum, last_autovacuum))::float8
        FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass""").fetchone()
    live, dead, table_bytes, index_bytes, since = row
    return {"live": live, "dead": dead, "table_bytes": table_bytes, "index_bytes": index_bytes,
            "last_vacuum_age_s": since}
