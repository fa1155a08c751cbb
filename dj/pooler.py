"""Is a connection pooler (PgBouncer, say) between dj and PostgreSQL, and what does it let dj do?

A pooler in transaction mode (PgBouncer's `pool_mode = transaction`: Heroku, Supabase, Neon and
most Kubernetes set-ups) lends a server connection for one transaction at a time, so nothing a
session remembers survives to the next transaction: a statement psycopg prepared (`_pg3_0`) exists
on one server connection and is missing on the next, while another client's `_pg3_0` already sits
there; session advisory locks, `SET` and `LISTEN` stay behind on a connection someone else gets.

How dj tells, without a setting: a pooler answers the client's start-up itself and gives it a
cancel key of its own, so the backend pid psycopg learns at connect (`conn.info.backend_pid`) is
not the pid of the server process that runs the queries (`pg_backend_pid()`). On a direct
connection the two are the same, always. That costs one query, once per URL and process, and
`connect()` then turns psycopg's automatic prepared statements off on every connection behind a
proxy (measured on a direct connection, they make single enqueues ~1.8x faster, so dj keeps them
there). What a proxy allows is then found by trying (`probe`): a two-statement transaction (a pooler
in statement mode refuses it, and dj cannot run without transactions) and a NOTIFY heard by a
LISTEN on another connection (only a pooler that keeps the session, or a direct connection, carries
it: behind a transaction pooler workers poll instead, unless DJ_LISTEN_URL gives them a direct
connection to listen on; see `check_listen_url`).
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import psycopg

from . import config
from .errors import DatabaseUnavailable, DJError

# How long a LISTEN waits for the probe's own NOTIFY before concluding that this URL cannot
# deliver it. Through a session that carries it, it arrives in a few milliseconds.
LISTEN_WAIT = 0.5
# The same for DJ_LISTEN_URL, where a miss is refused rather than worked around: more patience.
LISTEN_URL_WAIT = 3.0

_proxied: dict[str, bool] = {}
_proxied_lock = threading.Lock()


def connect(url: str, *, autocommit: bool = False, connect_timeout: int = 10, **kwargs) -> psycopg.Connection:
    """psycopg.connect, with errors as one masked line, and no prepared statements behind a proxy."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=connect_timeout, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to {config.mask_url(url)}: {_reason(exc, url, 'unreachable')}") \
            from exc
    except psycopg.ProgrammingError as exc:  # a malformed URL; libpq's message quotes it, password and all
        raise DatabaseUnavailable(f"invalid database URL {config.mask_url(url)}: {_reason(exc, url, 'malformed')}") \
            from exc
    try:
        adapt(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn


def adapt(conn: psycopg.Connection, url: str) -> psycopg.Connection:
    """Make `conn` safe behind a pooler: no automatic prepared statements if it is proxied.
    For connections dj did not open (a pool's `configure` callback, say)."""
    if behind_proxy(conn, url):
        conn.prepare_threshold = None
    return conn


def behind_proxy(conn: psycopg.Connection, url: str | None = None) -> bool:
    """Whether something other than PostgreSQL answered `conn`'s start-up (see the module doc).
    Remembered per URL for the life of the process; `url` None asks every time."""
    if url is not None:
        known = _proxied.get(url)
        if known is not None:
            return known
    idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    if idle and not conn.autocommit:
        conn.rollback()  # leave the connection as we found it
    proxied = pid != conn.info.backend_pid
    if url is not None:
        with _proxied_lock:
            _proxied[url] = proxied
    return proxied


@dataclass(frozen=True)
class Probe:
    """What `probe(url)` found."""

    url: str  # masked
    proxied: bool  # a proxy or pooler answers for PostgreSQL
    transactions: bool  # a transaction of several statements runs (not through statement pooling)
    listen: bool  # a LISTEN on this URL hears a NOTIFY sent on another connection

    @property
    def mode(self) -> str:
        """"direct", or the pooler's mode as dj sees it: "session", "transaction" or "statement"."""
        if not self.proxied:
            return "direct"
        if not self.transactions:
            return "statement"
        return "session" if self.listen else "transaction"

    @property
    def transaction_pooler(self) -> bool:
        """Sessions do not survive from one transaction to the next (transaction or statement mode)."""
        return self.mode in ("transaction", "statement")

    def describe(self) -> str:
        """One line for an operator, e.g. for `dj doctor`."""
        return {
            "direct": "direct connection to PostgreSQL; LISTEN works",
            "session": "a pooler in session mode in front; LISTEN works",
            "transaction": "a transaction pooler in front; LISTEN does not work through it "
                           "(workers poll, or set DJ_LISTEN_URL to a direct URL)",
            "statement": "a pooler in statement mode in front: dj's transactions cannot run through it",
        }[self.mode]

    def refusal(self) -> str | None:
        """Why dj cannot run through this URL at all, or None."""
        if self.mode == "statement":
            return (f"{self.url} is a pooler in statement mode, which refuses transactions of more than one "
                    "statement, and dj needs them: use transaction or session pooling, or a direct URL")
        return None


_probes: dict[str, Probe] = {}


def probe(url: str, *, listen_wait: float = LISTEN_WAIT) -> Probe:
    """Find out what is between dj and the database at `url` (see the module doc). Opens two or three
    short connections; takes a few ms, or up to `listen_wait` more behind a pooler that does not
    deliver NOTIFY to a listener. Remembered per URL for the life of the process. Raises DJError
    (DatabaseUnavailable) if the URL cannot be reached."""
    known = _probes.get(url)
    if known is not None:
        return known
    masked = config.mask_url(url)
    with connect(url, autocommit=True) as conn:
        proxied = behind_proxy(conn, url)
        if not proxied:  # PostgreSQL itself: transactions and LISTEN work, nothing to try
            result = Probe(masked, False, True, True)
            _probes[url] = result
            return result
    result = Probe(masked, True, _transactions_work(url), _listen_works(url, listen_wait))
    _probes[url] = result
    return result


def listen_target(database_url: str, listen_url: str | None = None) -> str | None:
    """Where a worker LISTENs: `listen_url` (DJ_LISTEN_URL) once it proves it works, else
    `database_url` if LISTEN works through it, else None: the worker polls. Raises DJError for
    what cannot work: a pooler in statement mode, a listen URL that is unreachable, points at
    another database or does not carry NOTIFY."""
    found = probe(database_url)
    if found.refusal():
        raise DJError(found.refusal())
    if listen_url:
        check_listen_url(database_url, listen_url)
        return listen_url
    return database_url if found.listen else None


def _transactions_work(url: str) -> bool:
    # On a connection of its own: PgBouncer in statement mode closes the client's connection.
    with connect(url, autocommit=True) as conn:
        try:
            with conn.transaction():
                conn.execute("SELECT 1")
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
    return True


def _listen_works(url: str, wait: float) -> bool:
    """Whether a LISTEN on one connection to `url` hears a NOTIFY sent on another. Behind a
    transaction pooler the LISTEN stays on whichever server connection ran it, and an idle client
    has no server connection to hear anything on."""
    channel = f"dj_probe_{uuid.uuid4().hex}"
    with connect(url, autocommit=True) as listener, connect(url, autocommit=True) as sender:
        listener.execute(f'LISTEN "{channel}"')
        sender.execute("SELECT pg_notify(%s, '')", (channel,))
        try:
            # The NOTIFY often runs on the very server connection the LISTEN was left on (PgBouncer
            # reuses the most recent one), which then delivers it to the sender: a sure sign,
            # without waiting.
            if any(n.channel == channel for n in sender.notifies(timeout=0)):
                return False
            return any(n.channel == channel for n in listener.notifies(timeout=wait, stop_after=1))
        finally:
            # Through a transaction pooler this reaches some server connection, most likely the
            # one that listened; the channel name is unique, so one left behind is harmless.
            listener.execute(f'UNLISTEN "{channel}"')


def check_listen_url(database_url: str, listen_url: str, *, wait: float = LISTEN_URL_WAIT) -> None:
    """Refuse a DJ_LISTEN_URL that cannot do its job: unreachable, another database than
    `database_url`, or one that does not carry NOTIFY (itself behind a transaction pooler). The
    test is the job itself: a NOTIFY sent through `database_url` must reach a LISTEN on
    `listen_url` (notifications stay within one database of one server)."""
    masked = config.mask_url(listen_url)
    try:
        listener = connect(listen_url, autocommit=True)
    except DJError as exc:
        raise DJError(f"DJ_LISTEN_URL: {exc}") from None
    channel = f"dj_probe_{uuid.uuid4().hex}"
    with listener, connect(database_url, autocommit=True) as sender:
        listener.execute(f'LISTEN "{channel}"')
        sender.execute("SELECT pg_notify(%s, '')", (channel,))
        if any(n.channel == channel for n in listener.notifies(timeout=wait, stop_after=1)):
            listener.execute(f'UNLISTEN "{channel}"')
            return
        (their_db, their_system), (our_db, our_system) = _identity(listener), _identity(sender)
        if their_db != our_db or (their_system and our_system and their_system != our_system):
            raise DJError(f"DJ_LISTEN_URL {masked} points at another database "
                          f"({_show(their_db, their_system)}) than DJ_DATABASE_URL {config.mask_url(database_url)} "
                          f"({_show(our_db, our_system)}): it must reach the same database, directly")
        raise DJError(f"DJ_LISTEN_URL {masked} did not hear a NOTIFY sent through DJ_DATABASE_URL within {wait:g}s: "
                      "it must be a direct connection (not through a transaction pooler) to the same database")


def _identity(conn: psycopg.Connection) -> tuple[str, str | None]:
    """(database name, the server's system identifier if this role may read it)."""
    name = conn.execute("SELECT current_database()").fetchone()[0]
    try:
        system = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0]
    except psycopg.Error:  # pg_control_system() may be for superusers and pg_monitor only
        system = None
    return name, system


def _show(name: str, system: str | None) -> str:
    return f"database {name}" + (f" on server {system}" if system else "")


def _reason(exc: BaseException, url: str, default: str) -> str:
    text = str(exc).strip()
    return config.mask_secrets(text.splitlines()[0] if text else default, url)
