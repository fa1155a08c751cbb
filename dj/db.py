"""Connections: which database, reaching it, and checking that it has dj's schema."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager, AbstractContextManager as ContextManager, \
    contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from . import config, connections, embedded, pooler
from .errors import SchemaMissing

if TYPE_CHECKING:
    from .connections import Conn



class PooledConnection(psycopg.Connection[Any]):
    """A connection of dj's pool, with one cursor kept for single enqueues.

    `conn.execute()` makes a new cursor, and with it a new psycopg Transformer that looks up
    the dumpers of the parameters and the loaders of the result again: for ENQUEUE_ONE (nine
    parameters, two result columns) that was about a sixth of the client's instructions per
    enqueue (callgrind: 310k -> 262k). A cursor that executes the same query object again keeps
    its Transformer. The connection is used by one caller at a time (getconn to putconn), so
    its cursor is too."""

    _enqueue_cursor: psycopg.Cursor[Any] | None = None

    def enqueue_cursor(self) -> psycopg.Cursor[Any]:
        cur = self._enqueue_cursor
        if cur is None:
            cur = self._enqueue_cursor = self.cursor()
        return cur


class AsyncPooledConnection(psycopg.AsyncConnection[Any]):
    """PooledConnection for the async pools."""

    _enqueue_cursor: psycopg.AsyncCursor[Any] | None = None

    def enqueue_cursor(self) -> psycopg.AsyncCursor[Any]:
        cur = self._enqueue_cursor
        if cur is None:
            cur = self._enqueue_cursor = self.cursor()
        return cur


_override: str | None = None
_embedded_url: str | None = None
_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()
# An AsyncConnectionPool belongs to the event loop it was opened on (its lock and its tasks do),
# so there is one per URL per loop: an app with several loops (a thread each, or pytest-asyncio's
# loop per test) gets a pool on each.
_async_pools: dict[tuple[str, asyncio.AbstractEventLoop], AsyncConnectionPool[AsyncPooledConnection]] = {}
_async_opening: dict[tuple[str, asyncio.AbstractEventLoop], asyncio.Lock] = {}


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


def connect(url: str | None = None, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
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
            p = ConnectionPool(url, min_size=1, max_size=10, open=False, name="dj", connection_class=PooledConnection,
                               kwargs={"autocommit": True}, configure=_configure(url))
            # Waiting for the first connection keeps a one-thread enqueuer on one connection: a
            # request made before it is ready grows the pool, and psycopg_pool hands its idle
            # connections out in turn, so each call would meet a cold backend (10-15% slower).
            p.open(wait=True, timeout=10)
            _pools[url] = p
        return p


def _configure(url: str) -> Callable[[psycopg.Connection[Any]], None]:
    """The pool's set-up of each new connection: see dj.pooler."""
    def configure(conn: psycopg.Connection[Any]) -> None:
        pooler.adapt(conn, url)

    return configure


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


def single_cursor(conn: psycopg.Connection[Any]) -> psycopg.Cursor[Any]:
    """Where to run ENQUEUE_ONE: the kept cursor of a connection of dj's pool (see
    PooledConnection), a new one on a caller's connection."""
    return conn.enqueue_cursor() if isinstance(conn, PooledConnection) else conn.cursor()


def borrow(conn: Conn | None = None, url: str | None = None) -> ContextManager[psycopg.Connection[Any]]:
    """The caller's connection as it is (their transaction decides; see dj/connections.py), or a
    pooled autocommit one. TypeError for an async one."""
    return nullcontext(connections.sync_connection(conn)) if conn is not None else _Pooled(pool(url))


# --- asyncio ---------------------------------------------------------------------------------------

async def async_pool(url: str | None = None) -> AsyncConnectionPool[AsyncPooledConnection]:
    """This event loop's pool for `url`: the async counterpart of pool()."""
    url = url or database_url()
    key = (url, asyncio.get_running_loop())
    p = _async_pools.get(key)
    if p is not None:
        return p
    async with _async_opening.setdefault(key, asyncio.Lock()):
        p = _async_pools.get(key)
        if p is None:
            _forget_closed_loops()
            # A clear error instead of a pool timeout, and whether a pooler is in front (once per
            # URL and process, on a thread: dj.pooler speaks sync psycopg).
            proxied = await asyncio.to_thread(_check_reachable, url)

            async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
                if proxied:  # see dj.pooler: no prepared statements behind a transaction pooler
                    conn.prepare_threshold = None

            p = AsyncConnectionPool(url, min_size=1, max_size=10, open=False, name="dj-async",
                                    connection_class=AsyncPooledConnection,
                                    kwargs={"autocommit": True}, configure=configure)
            try:
                await p.open(wait=True, timeout=10)  # see pool() on why it waits
            except BaseException:
                await p.close()  # its tasks would go on trying to connect
                raise
            _async_pools[key] = p
    return p


def loop_async_pool(url: str | None = None) -> AsyncConnectionPool[AsyncPooledConnection] | None:
    """This loop's pool for `url` if it is open already: async_pool() without a coroutine, for
    the hot path."""
    return _async_pools.get((url or database_url(), asyncio.get_running_loop()))


def _check_reachable(url: str) -> bool:
    """Connect once (DatabaseUnavailable if that fails); whether a pooler answers for the server."""
    with pooler.connect(url) as conn:
        return pooler.behind_proxy(conn, url)


def _forget_closed_loops() -> None:
    """Drop the pools of loops that have been closed (asyncio.run() has returned, say). They cannot
    be closed any more (their loop is gone); their connections close as they are collected."""
    # list(dict) copies the keys in one step: loops on other threads may be adding pools meanwhile.
    for key in [k for k in list(_async_pools) if k[1].is_closed()]:
        _async_pools.pop(key, None)
        _async_opening.pop(key, None)


async def close_async_pools() -> None:
    """Close this event loop's pools: for an app's shutdown (Starlette's lifespan, say)."""
    loop = asyncio.get_running_loop()
    for key in [k for k in list(_async_pools) if k[1] is loop]:
        p = _async_pools.pop(key, None)
        _async_opening.pop(key, None)
        if p is not None:
            await p.close()


class _AsyncPooled:
    """An async pooled connection for an `async with` block, without the pool's own connection()
    overhead (see _Pooled)."""

    __slots__ = ("url", "pool", "conn")

    def __init__(self, url: str | None):
        self.url = url

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        self.pool = loop_async_pool(self.url) or await async_pool(self.url)
        self.conn = await self.pool.getconn()
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.putconn(self.conn)


class _AsyncBorrowed:
    __slots__ = ("obj",)

    def __init__(self, obj: Conn):
        self.obj = obj

    async def __aenter__(self) -> psycopg.AsyncConnection[Any]:
        return await connections.async_connection(self.obj)

    async def __aexit__(self, *exc: object) -> None:
        pass


def borrow_async(conn: Conn | None = None,
                 url: str | None = None) -> AsyncContextManager[psycopg.AsyncConnection[Any]]:
    """The async counterpart of borrow(). TypeError (on entry) for a sync connection."""
    return _AsyncBorrowed(conn) if conn is not None else _AsyncPooled(url)


def ensure_schema(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT to_regclass('jobs') IS NOT NULL AND to_regclass('workers') IS NOT NULL").fetchone()
    if not (row and row[0]):
        raise SchemaMissing(_display_url(conn))


def _display_url(conn: psycopg.Connection) -> str:
    i = conn.info
    if i.host.startswith("/"):
        return f"postgresql://{i.user}@/{i.dbname}?host={i.host}"
    return f"postgresql://{i.user}@{i.host}:{i.port}/{i.dbname}"
