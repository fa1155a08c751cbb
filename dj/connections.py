"""`conn=`: the caller's connection, whose current transaction an enqueue joins.

A caller hands dj a psycopg connection, or a SQLAlchemy object on the psycopg 3 driver; dj finds
the psycopg connection under it and runs its statements there, inside whatever transaction the
caller has open. dj never commits, rolls back or closes it: the caller's commit makes the job
visible and sends its NOTIFY (PostgreSQL delivers notifications at commit), and a rollback leaves
neither.

SQLAlchemy is imported only when such an object is passed: a plain `import dj` does not load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, Union

import psycopg

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection, AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session

    # What `conn=` accepts, for type checkers.
    SyncConn = Union[psycopg.Connection[Any], Session, scoped_session[Any], SAConnection]
    AsyncConn = Union[psycopg.AsyncConnection[Any], AsyncSession, async_scoped_session[Any], SAAsyncConnection]
    Conn = Union[SyncConn, AsyncConn]

C = TypeVar("C")

SYNC_KINDS = ("a psycopg Connection, or a SQLAlchemy Session (or scoped_session) or Connection on the psycopg "
              "driver (postgresql+psycopg)")
ASYNC_KINDS = ("a psycopg AsyncConnection, or a SQLAlchemy AsyncSession (or async_scoped_session) or "
               "AsyncConnection on the psycopg driver (postgresql+psycopg)")


def _name(obj: object) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def _from_sqlalchemy(obj: object) -> bool:
    # Any class in the MRO: an app's own Session subclass (SQLModel's, say) lives in its module.
    return any(c.__module__.startswith("sqlalchemy.") for c in type(obj).__mro__)


def _current_session(obj: object) -> object:
    """The session a scoped_session (Flask-SQLAlchemy's `db.session`) stands for in this scope; any
    other object as it is."""
    from sqlalchemy.ext.asyncio import async_scoped_session
    from sqlalchemy.orm import scoped_session

    return obj() if isinstance(obj, (scoped_session, async_scoped_session)) else obj


def is_async(obj: object) -> bool:
    """Whether `conn=obj` is for enqueue_async (True) or enqueue (False); TypeError for anything
    dj cannot write through."""
    if isinstance(obj, psycopg.Connection):
        return False
    if isinstance(obj, psycopg.AsyncConnection):
        return True
    if _from_sqlalchemy(obj):
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection, AsyncSession, async_scoped_session
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(obj, (Session, SAConnection, scoped_session)):
            return False
        if isinstance(obj, (AsyncSession, SAAsyncConnection, async_scoped_session)):
            return True
    raise TypeError(f"conn= takes {SYNC_KINDS}; or, for enqueue_async, {ASYNC_KINDS}; got {_name(obj)}")


def _check_driver(obj: object, dialect: Any) -> None:
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        raise TypeError(f"conn= got a SQLAlchemy {type(obj).__name__} on {dialect.name}+{dialect.driver}; dj writes "
                        f"through psycopg 3: use an engine URL that starts with postgresql+psycopg://")


def _driver(obj: object, driver: object, expected: type[C]) -> C:
    if not isinstance(driver, expected):  # a dialect named psycopg over some other driver
        raise TypeError(f"conn= got a SQLAlchemy {type(obj).__name__} whose driver connection is "
                        f"{_name(driver)}, not a {expected.__module__}.{expected.__name__}")
    return driver


def check_kind(obj: object, want_async: bool) -> None:
    """The TypeError sync_connection() or async_connection() raises for `obj` of the other kind
    (or of no kind), without touching it: for the test mode (dj.testing), which writes nothing."""
    if is_async(obj) and not want_async:
        raise TypeError(f"{_name(obj)} is async: use `await task.using(conn=...).enqueue_async(...)`, "
                        f"or pass enqueue() {SYNC_KINDS}")
    if want_async and not is_async(obj):
        raise TypeError(f"{_name(obj)} is not async: use `task.using(conn=...).enqueue(...)`, "
                        f"or pass enqueue_async() {ASYNC_KINDS}")


def sync_connection(obj: object) -> psycopg.Connection[Any]:
    """The psycopg connection under `obj`, in the transaction `obj` has open (begun, the way
    SQLAlchemy begins one before its first statement, if it has none yet)."""
    if isinstance(obj, psycopg.Connection):  # first: the common case, and cheap
        return obj
    if is_async(obj):
        raise TypeError(f"{_name(obj)} is async: use `await task.using(conn=...).enqueue_async(...)`, "
                        f"or pass enqueue() {SYNC_KINDS}")
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    obj = _current_session(obj)
    # Session.connection() joins the session's transaction, beginning it if needed.
    sa_conn = obj.connection() if isinstance(obj, Session) else obj
    assert isinstance(sa_conn, SAConnection)  # is_async() let nothing else through
    _check_driver(obj, sa_conn.dialect)
    if not sa_conn.in_transaction():
        # Otherwise the caller's commit() would be a no-op for SQLAlchemy and the job, written
        # in psycopg's implicit transaction, would be rolled back when the connection is returned.
        sa_conn.begin()
    return _driver(obj, sa_conn.connection.driver_connection, psycopg.Connection)


async def async_connection(obj: object) -> psycopg.AsyncConnection[Any]:
    """The psycopg AsyncConnection under `obj`, in its open transaction; see sync_connection()."""
    if isinstance(obj, psycopg.AsyncConnection):
        return obj
    if not is_async(obj):
        raise TypeError(f"{_name(obj)} is not async: use `task.using(conn=...).enqueue(...)`, "
                        f"or pass enqueue_async() {ASYNC_KINDS}")
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection, AsyncSession

    obj = _current_session(obj)
    sa_conn = await obj.connection() if isinstance(obj, AsyncSession) else obj
    assert isinstance(sa_conn, SAAsyncConnection)
    _check_driver(obj, sa_conn.dialect)
    if not sa_conn.in_transaction():
        await sa_conn.begin()
    raw = await sa_conn.get_raw_connection()
    return _driver(obj, raw.driver_connection, psycopg.AsyncConnection)
