"""Connections: which database, reaching it, and checking that it has dj's schema."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager, contextmanager, nullcontext

import psycopg
from psycopg_pool import ConnectionPool

from . import config, embedded, pooler
from .errors import SchemaMissing

_override: str | None = None
_embedded_url: str | None = None
_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def use_database(url: str | None) -> None:
    """Make `url` this process's database (what `--database-url` does); None restores the default."""
    global _override
    _override = url


def database_url() -> str:
    """The flag, else DJ_DATABASE_URL, else the embedded server (started if needed)."""
    global _embedded_url
    explicit = _override or config.configured_url()
    if explicit:
        return explicit
    # Starting (or finding) the embedded server takes a file lock and a look at its data
    # directory; once per process is enough.
    if _embedded_url is None:
        _embedded_url = embedded.start()
    return _embedded_url


def connect(url: str | None = None, *, autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """A new connection; errors are one masked line (DatabaseUnavailable). Behind a pooler it
    prepares no statements (see dj.pooler)."""
    return pooler.connect(url or database_url(), autocommit=autocommit, **kwargs)


def pool(url: str | None = None) -> ConnectionPool:
    """A process-wide pool per URL, for enqueueing from many threads (a web app, say)."""
    url = url or database_url()
    p = _pools.get(url)
    if p is not None:
        return p
    with _pools_lock:
        p = _pools.get(url)
        if p is None:
            connect(url).close()  # fail fast with a clear error instead of a pool timeout
            # Autocommit: an enqueue is one pipelined round trip with no BEGIN/COMMIT around it;
            # transaction() opens a real transaction block itself.
            p = ConnectionPool(url, min_size=1, max_size=10, open=False, name="dj",
                               kwargs={"autocommit": True}, configure=lambda c: pooler.adapt(c, url))
            # Waiting for the first connection keeps a one-thread enqueuer on one connection: a
            # request made before it is ready grows the pool, and psycopg_pool hands its idle
            # connections out in turn, so each call would meet a cold backend (10-15% slower).
            p.open(wait=True, timeout=10)
            _pools[url] = p
        return p


@contextmanager
def transaction(url: str | None = None) -> Iterator[psycopg.Connection]:
    """A pooled connection for one transaction: committed on success, rolled back on error.

    Jobs use this for their own queries; it saves a connection set-up per job.
    """
    with connection(url) as conn, conn.transaction():
        yield conn


class _Pooled:
    """A connection from the pool for a `with` block. The pool's own `connection()` also opens a
    commit/rollback block on the connection and times the use; for dj's autocommit connections
    that is dead weight, and every single enqueue pays it (measured: 8 us, 3% of an enqueue)."""

    __slots__ = ("pool", "conn")

    def __init__(self, p: ConnectionPool):
        self.pool = p

    def __enter__(self) -> psycopg.Connection:
        self.conn = self.pool.getconn()
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.pool.putconn(self.conn)  # a connection left in a transaction is rolled back by the pool


def connection(url: str | None = None) -> ContextManager[psycopg.Connection]:
    """A pooled autocommit connection: each statement commits on its own, and `conn.transaction()`
    opens a transaction where you choose (with its isolation level, say)."""
    return _Pooled(pool(url))


def borrow(conn: psycopg.Connection | None = None, url: str | None = None) -> ContextManager[psycopg.Connection]:
    """The caller's connection as it is (their transaction decides), or a pooled autocommit one."""
    return nullcontext(conn) if conn is not None else _Pooled(pool(url))


def ensure_schema(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT to_regclass('jobs') IS NOT NULL AND to_regclass('workers') IS NOT NULL").fetchone()
    if not row[0]:
        raise SchemaMissing(_display_url(conn))


def _display_url(conn: psycopg.Connection) -> str:
    i = conn.info
    if i.host.startswith("/"):
        return f"postgresql://{i.user}@/{i.dbname}?host={i.host}"
    return f"postgresql://{i.user}@{i.host}:{i.port}/{i.dbname}"
