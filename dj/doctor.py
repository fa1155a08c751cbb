"""`dj doctor`: check the configured server for what dj needs, one line per check, OK or WARN
with the fix.

Python API: `run(url) -> Report`; `Report.status` is "ok" or "warn", `Report.as_dict()` is what
`dj doctor --json` prints. A server that cannot be reached raises DJError (the CLI's exit 2).
Every check reads only: nothing here changes the server.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import psycopg

from . import config, db, pooler, snapshot, vacuum
from .errors import DJError

OK, WARN = "OK", "WARN"

# The oldest server version dj is tested on, and the oldest it can use: CLAIM's positions need
# extract(epoch ...) to be exact (numeric, PostgreSQL 14+), and VACUUM (SKIP_LOCKED) needs 12.
MIN_VERSION = 140000
# Connections a worker process keeps open: its main loop, its heartbeat and maintenance, its
# listener; a fourth for the seconds it vacuums jobs (one worker at a time). Jobs that use
# dj.db.pool() open up to 10 more each, on demand.
CONNECTIONS_PER_WORKER = 3
POOL_CONNECTIONS = 10
# jobs: warn when this many dead rows wait and they are most of the table.
DEAD_ROWS_WARN = 500_000
# jobs: warn when the table takes this many times what its live rows need (about 300 bytes each at
# fillfactor 50, with its indexes), and is bigger than BLOAT_MIN_BYTES.
BLOAT_FACTOR = 10
BLOAT_MIN_BYTES = 256 * 2**20
LIVE_ROW_BYTES = 300


@dataclass
class Check:
    name: str
    status: str  # OK or WARN
    message: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    url: str  # masked
    checks: list[Check]

    @property
    def status(self) -> str:
        return "warn" if any(c.status == WARN for c in self.checks) else "ok"

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "status": self.status, "checks": [asdict(c) for c in self.checks]}


def run(url: str | None = None) -> Report:
    """Run every check against `url` (default: the configured database)."""
    url = url or db.database_url()
    with db.connect(url, autocommit=True) as conn:
        checks = [check(conn) for check in CHECKS]
    checks.insert(1, _pooler(url))
    return Report(config.mask_url(url), checks)


def _version(conn: psycopg.Connection) -> Check:
    num = int(conn.execute("SHOW server_version_num").fetchone()[0])
    text = conn.execute("SHOW server_version").fetchone()[0]
    if num < MIN_VERSION:
        return Check("server version", WARN, f"PostgreSQL {text}",
                     "upgrade to PostgreSQL 14 or later: dj's claim positions need it", {"version_num": num})
    return Check("server version", OK, f"PostgreSQL {text}", data={"version_num": num})


def _pooler(url: str) -> Check:
    try:
        probe = pooler.probe(url)
    except DJError as exc:
        return Check("pooler", WARN, f"could not probe: {exc}", "check that the URL reaches PostgreSQL")
    data = {"mode": probe.mode, "listen": probe.listen}
    if probe.mode == "statement":
        return Check("pooler", WARN, probe.describe(), "use transaction or session pooling, or a direct URL", data)
    if probe.listen:
        return Check("pooler", OK, probe.describe(), data=data)
    listen_url = os.environ.get("DJ_LISTEN_URL", "").strip()
    if not listen_url:
        return Check("pooler", WARN, probe.describe(),
                     "set DJ_LISTEN_URL to a direct URL of the same database, so idle workers wake at once "
                     "instead of at their poll", data)
    try:
        pooler.check_listen_url(url, listen_url)
    except DJError as exc:
        return Check("pooler", WARN, f"{probe.describe()}; {exc}", "fix DJ_LISTEN_URL", data)
    return Check("pooler", OK, f"{probe.describe()}; DJ_LISTEN_URL carries NOTIFY", data=data)


def _autovacuum(conn: psycopg.Connection) -> Check:
    on, naptime = conn.execute(
        "SELECT current_setting('autovacuum')::bool, current_setting('autovacuum_naptime')").fetchone()
    data = {"autovacuum": on, "naptime": naptime}
    if not on:
        return Check("autovacuum", WARN, "autovacuum is off: dj's workers vacuum jobs themselves, but no other "
                     "table (job_stats, batches, your own) is vacuumed or analyzed",
                     "set autovacuum = on in postgresql.conf (or ask your provider)", data)
    return Check("autovacuum", OK, f"on, naptime {naptime} (dj's workers also vacuum jobs when dead rows "
                 "pile up between visits)", data=data)


def _jobs_table(conn: psycopg.Connection) -> Check:
    if conn.execute("SELECT to_regclass('jobs')").fetchone()[0] is None:
        return Check("jobs table", WARN, "no jobs table", "run 'dj migrate'")
    s = vacuum.dead_rows(conn)
    live, dead, size = s["live"], s["dead"], s["table_bytes"] + s["index_bytes"]
    since = s["last_vacuum_age_s"]
    message = (f"{live:,} live and {dead:,} dead rows, {size / 2**20:.0f} MiB with indexes; last vacuum "
               + ("never" if since is None else f"{since:.0f}s ago"))
    if dead >= DEAD_ROWS_WARN and dead > live:
        return Check("jobs table", WARN, message, "run 'VACUUM jobs' (running workers do it themselves unless an "
                     "old snapshot stops it; see the oldest snapshot)", s)
    if size > BLOAT_MIN_BYTES and size > BLOAT_FACTOR * LIVE_ROW_BYTES * max(live, 1):
        return Check("jobs table", WARN, message + ", mostly empty space",
                     "when the queue is quiet, 'VACUUM FULL jobs' (it locks the table while it runs) "
                     "or pg_repack gives the space back", s)
    return Check("jobs table", OK, message, data=s)


def _oldest_snapshot(conn: psycopg.Connection) -> Check:
    s = snapshot.oldest(conn)
    after = snapshot.warn_after()
    if s is None:
        return Check("oldest snapshot", OK, "no other session holds a snapshot in this database")
    if s["age_s"] >= after:
        return Check("oldest snapshot", WARN, snapshot.describe(s),
                     f"end that transaction (SELECT pg_terminate_backend({s['pid']}) if it is stuck), and set "
                     "idle_in_transaction_session_timeout so that forgotten ones end by themselves: while it "
                     "lasts vacuum cannot clean jobs", s)
    return Check("oldest snapshot", OK, snapshot.describe(s), data=s)


def _connections(conn: psycopg.Connection) -> Check:
    max_conn, reserved, in_use = conn.execute(
        "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int,"
        " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')").fetchone()
    try:
        workers = conn.execute("SELECT count(*) FROM workers").fetchone()[0]
    except psycopg.errors.UndefinedTable:
        workers = 0
    need = workers * CONNECTIONS_PER_WORKER
    usable = max_conn - reserved
    data = {"max_connections": max_conn, "reserved": reserved, "in_use": in_use, "workers": workers,
            "worker_connections": need}
    message = (f"max_connections {max_conn} ({reserved} reserved), {in_use} in use; {workers} worker process(es) "
               f"use {need} ({CONNECTIONS_PER_WORKER} each, one more while vacuuming, plus up to "
               f"{POOL_CONNECTIONS} each for jobs that use dj.db.pool())")
    if need > 0.8 * usable or in_use > 0.9 * usable:
        return Check("connections", WARN, message, "raise max_connections, run fewer worker processes, or put "
                     "a transaction pooler in front (see the README)", data)
    return Check("connections", OK, message, data=data)


def _schema(conn: psycopg.Connection) -> Check:
    from alembic.script import ScriptDirectory

    from .schema import alembic_config

    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    try:
        current = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except psycopg.errors.UndefinedTable:
        current = None
    data = {"head": head, "database": current[0] if current else None}
    if current is None:
        return Check("schema", WARN, "no dj schema in this database", "run 'dj migrate'", data)
    if current[0] != head:
        return Check("schema", WARN, f"database at {current[0]}, this dj needs {head}", "run 'dj migrate'", data)
    return Check("schema", OK, f"at {head}", data=data)


def lines(report: Report) -> list[str]:
    """The human form: one line per check, the fix after a dash."""
    width = max(len(c.name) for c in report.checks)
    out = []
    for c in report.checks:
        fix = f" -- fix: {c.fix}" if c.status == WARN and c.fix else ""
        out.append(f"{c.status:<4} {c.name:<{width}}  {c.message}{fix}")
    return out


# In the order `dj doctor` prints them (the pooler's check goes second: it needs the URL, not a connection).
CHECKS: tuple[Callable[..., Check], ...] = (_version, _autovacuum, _jobs_table, _oldest_snapshot, _connections,
                                            _schema)
