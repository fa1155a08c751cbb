"""dj's pytest plugin. The `pytest11` entry point registers it, so installing dj is enough.

Fixtures:
- `dj_jobs`: `dj.testing.capture()` around the test: enqueues are recorded, nothing is written.
- `dj_inline`: `dj.testing.inline()` around the test: an enqueue runs the job at once.
- `dj_database`: a migrated, empty database for the test; its value is the URL, and dj's own
  connections and child processes (DJ_DATABASE_URL) use it. One database is created per session
  on the server of DJ_DATABASE_URL, or on dj's embedded server when that is unset, and dropped at
  the end; each test using it starts with every table emptied.

pytest imports this module in every run where dj is installed, whether the tests use dj or not:
it must stay cheap and harmless. Nothing of dj is imported and no environment variable is read
until a fixture is used.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def dj_jobs() -> Iterator[Any]:
    """The test's `dj.testing.capture()`: `.jobs`, `.assert_enqueued(...)`, `.drain()`..."""
    from dj import testing

    with testing.capture() as jobs:
        yield jobs


@pytest.fixture
def dj_inline() -> Iterator[Any]:
    """The test's `dj.testing.inline()`: every enqueue runs the job at once, in the test."""
    from dj import testing

    with testing.inline() as jobs:
        yield jobs


@pytest.fixture(scope="session")
def dj_database_url() -> Iterator[str]:
    """A database of the session's own, migrated; dj is pointed at it for the whole session."""
    url, drop = create_database()
    yield url
    drop()


@pytest.fixture
def dj_database(dj_database_url: str) -> str:
    """The session's database with every table emptied: what each integration test starts from."""
    empty_tables(dj_database_url)
    return dj_database_url


def create_database() -> tuple[str, Any]:
    """Create and migrate a database on the configured server, and make it dj's database (this
    process's and, through DJ_DATABASE_URL, its children's). Returns its URL and a function that
    points dj back where it was and drops the database."""
    import os
    import uuid

    import psycopg
    from psycopg import conninfo

    import dj
    from dj import db

    server_url = os.environ.get("DJ_DATABASE_URL") or db.database_url()
    name = f"dj_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = conninfo.make_conninfo(server_url, dbname=name)
    previous = os.environ.get("DJ_DATABASE_URL")
    os.environ["DJ_DATABASE_URL"] = url  # workers and CLI commands the tests start inherit it
    db.use_database(url)

    def drop() -> None:
        db.use_database(None)
        if previous is None:
            os.environ.pop("DJ_DATABASE_URL", None)
        else:
            os.environ["DJ_DATABASE_URL"] = previous
        for pool in list(db._pools.values()):
            pool.close()
        db._pools.clear()
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        dj.migrate(url)
    except BaseException:
        drop()
        raise
    return url, drop


def empty_tables(url: str) -> None:
    """Empty every table but Alembic's, and restart the ids."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
        truncate = "TRUNCATE " + ", ".join(f'"{t}"' for t in tables) + " RESTART IDENTITY CASCADE"
        # A worker that outlives one test (a module-scoped one, say) keeps reading jobs and
        # queue_settings, about once a second (its probe). TRUNCATE locks the tables one after
        # another, so it can deadlock with such a read that locked them in the other order; the
        # server then cancels one of the two, often the TRUNCATE. Try again: the read has ended.
        for attempt in range(5):
            try:
                conn.execute(truncate)
                return
            except psycopg.errors.DeadlockDetected:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
