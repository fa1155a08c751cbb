"""Enqueueing inside a SQLAlchemy transaction (Session, Connection, AsyncSession, AsyncConnection on
postgresql+psycopg): the job commits and rolls back with the caller's rows, savepoints included,
and dj never commits, rolls back or closes what it was given."""

import asyncio
import threading
import time

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import dj
from dj.task import COPY_AT
from tests.conftest import wait_for
from tests.support_jobs import record
from tests.support_sqlalchemy import sqlalchemy_url

ROW = sa.text("INSERT INTO test_runs (job_id, marker, attempt, pid) VALUES (0, :m, 0, 0)")


@pytest.fixture(scope="module")
def engine(db_url):
    e = sa.create_engine(sqlalchemy_url(db_url))
    yield e
    e.dispose()


def jobs(conn) -> list[list]:
    return [r[0] for r in conn.execute("SELECT args FROM jobs ORDER BY id")]


def rows(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs ORDER BY marker")]


# --- sync -----------------------------------------------------------------------------------------

def test_a_session_commit_writes_the_row_and_the_job_together(engine, conn):
    with Session(engine) as session:
        session.execute(ROW, {"m": "user-1"})
        job_id = record.using(conn=session).enqueue("welcome-1")
        assert jobs(conn) == [] and rows(conn) == []  # nothing is visible before the commit
        session.commit()
        assert session.execute(sa.text("SELECT 1")).scalar() == 1  # the session is still the caller's
    assert conn.execute("SELECT id, args FROM jobs").fetchall() == [(job_id, ["welcome-1"])]
    assert rows(conn) == ["user-1"]


def test_a_session_rollback_leaves_no_job(engine, conn):
    with Session(engine) as session:
        session.execute(ROW, {"m": "user-1"})
        record.using(conn=session).enqueue("ghost")
        record.using(conn=session).enqueue_many([(i,) for i in range(COPY_AT + 1)])  # COPY, in their transaction
        assert session.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == COPY_AT + 2
        session.rollback()
        assert session.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 0
    assert jobs(conn) == [] and rows(conn) == []


def test_a_savepoint_rolled_back_takes_only_its_own_jobs(engine, conn):
    with Session(engine) as session:
        record.using(conn=session).enqueue("outer")
        nested = session.begin_nested()
        record.using(conn=session).enqueue("inner")
        record.using(conn=session).enqueue_many([("inner-many",)] * 3)
        nested.rollback()
        with session.begin_nested():  # a savepoint released: its job stays
            record.using(conn=session).enqueue("kept")
        session.commit()
    assert jobs(conn) == [["outer"], ["kept"]]


def test_a_connection_not_yet_in_a_transaction_gets_one_that_its_commit_ends(engine, conn):
    with engine.connect() as c:
        assert not c.in_transaction()
        record.using(conn=c).enqueue("connect")
        assert c.in_transaction()  # begun the way SQLAlchemy begins one for its own first statement
        c.commit()
    with engine.connect() as c:
        record.using(conn=c).enqueue("closed without commit")
    with engine.begin() as c:
        c.execute(ROW, {"m": "row"})
        record.using(conn=c).enqueue("begin")
    assert jobs(conn) == [["connect"], ["begin"]] and rows(conn) == ["row"]


class AppSession(Session):
    """An application's own Session class (SQLModel's is one), defined outside SQLAlchemy."""


def test_a_session_subclass_and_a_scoped_session_are_accepted(engine, conn):
    with AppSession(engine) as session:
        record.using(conn=session).enqueue("subclass")
        session.commit()
    scoped = scoped_session(sessionmaker(engine))  # Flask-SQLAlchemy's db.session is one
    record.using(conn=scoped).enqueue("scoped, rolled back")
    scoped.rollback()
    record.using(conn=scoped).enqueue("scoped")
    scoped.commit()
    scoped.remove()
    assert jobs(conn) == [["subclass"], ["scoped"]]


def test_unique_jobs_inside_a_session_transaction(engine, db_url, conn):
    with Session(engine) as session:
        first = record.using(conn=session, unique_key="user:7").enqueue(7)
        assert record.using(conn=session, unique_key="user:7").enqueue(8) == first
        many = record.using(conn=session, unique=True).enqueue_many([(1,), (1,), (2,)])
        assert many[0] == many[1] != many[2]
        # Another transaction enqueueing the same key waits for ours (the unique index), then
        # returns our job once we commit.
        other: list[int] = []
        t = threading.Thread(target=lambda: other.append(record.using(unique_key="user:7").enqueue(9)))
        t.start()
        time.sleep(0.5)
        assert other == []
        session.commit()
        t.join(30)
    assert other == [first]
    assert jobs(conn) == [[7], [1], [2]]


def test_a_batch_opened_on_a_session_commits_with_it(engine, conn):
    with Session(engine) as session:
        with dj.batch(conn=session) as b:
            record.using(conn=session).enqueue(1)
        session.rollback()
    assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
    with Session(engine) as session:
        with dj.batch(conn=session) as b:
            record.using(conn=session).enqueue_many([(1,), (2,)])
        session.commit()
    assert conn.execute("SELECT total FROM batches WHERE id = %s", (b.id,)).fetchone()[0] == 2


def test_a_worker_is_woken_at_commit_and_not_before(engine, conn, worker_process):
    # Polling only once a minute: a job run within seconds of the commit was woken by its NOTIFY.
    worker = worker_process("--poll-interval", "60")
    record.enqueue("probe")
    wait_for(lambda: "probe" in rows(conn), message="the worker to run a first job")
    with Session(engine) as session:
        record.using(conn=session).enqueue("woken")
        time.sleep(1.0)
        assert "woken" not in rows(conn)
        session.commit()
        committed = time.monotonic()
    wait_for(lambda: "woken" in rows(conn), timeout=20, message="the job to run soon after the commit")
    assert time.monotonic() - committed < 20 and worker.poll() is None


# --- async ----------------------------------------------------------------------------------------

def run_async(db_url, body):
    async def main():
        engine = create_async_engine(sqlalchemy_url(db_url))
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_an_async_session_commits_and_rolls_back_its_jobs(db_url, conn):
    async def body(engine):
        async with AsyncSession(engine) as session:
            await session.execute(ROW, {"m": "rolled-back"})
            await record.using(conn=session).enqueue_async("ghost")
            await record.using(conn=session).enqueue_many_async([(i,) for i in range(COPY_AT + 1)])
            await session.rollback()
            await session.execute(ROW, {"m": "user-1"})
            job_id = await record.using(conn=session).enqueue_async("welcome-1")
            assert jobs(conn) == []
            await session.commit()
            assert (await session.execute(sa.text("SELECT 1"))).scalar() == 1
        return job_id

    job_id = run_async(db_url, body)
    assert conn.execute("SELECT id, args FROM jobs").fetchall() == [(job_id, ["welcome-1"])]
    assert rows(conn) == ["user-1"]


def test_an_async_savepoint_rolled_back_takes_only_its_own_jobs(db_url, conn):
    async def body(engine):
        async with AsyncSession(engine) as session:
            await record.using(conn=session).enqueue_async("outer")
            nested = await session.begin_nested()
            await record.using(conn=session).enqueue_async("inner")
            await nested.rollback()
            async with session.begin_nested():
                await record.using(conn=session).enqueue_many_async([("kept",)])
            await session.commit()

    run_async(db_url, body)
    assert jobs(conn) == [["outer"], ["kept"]]


def test_an_async_connection_and_unique_jobs_in_its_transaction(db_url, conn):
    async def body(engine):
        async with engine.connect() as c:
            first = await record.using(conn=c, unique_key="k").enqueue_async(1)
            assert await record.using(conn=c, unique_key="k").enqueue_async(2) == first
            many = await record.using(conn=c, unique=True).enqueue_many_async([(5,), (5,)])
            assert many[0] == many[1]
            await c.commit()
        async with engine.connect() as c:
            await record.using(conn=c).enqueue_async("closed without commit")
        async with engine.begin() as c:
            await record.using(conn=c).enqueue_async("begin")
        return first

    first = run_async(db_url, body)
    assert conn.execute("SELECT id FROM jobs ORDER BY id").fetchone()[0] == first
    assert jobs(conn) == [[1], [5], ["begin"]]


def test_an_async_scoped_session_is_accepted(db_url, conn):
    async def body(engine):
        scoped = async_scoped_session(async_sessionmaker(engine), scopefunc=asyncio.current_task)
        await record.using(conn=scoped).enqueue_async("scoped, rolled back")
        await scoped.rollback()
        await record.using(conn=scoped).enqueue_async("scoped")
        await scoped.commit()
        await scoped.remove()

    run_async(db_url, body)
    assert jobs(conn) == [["scoped"]]


def test_an_async_batch_on_an_async_session(db_url, conn):
    async def body(engine):
        async with AsyncSession(engine) as session:
            async with dj.batch(conn=session) as b:
                await record.using(conn=session).enqueue_many_async([(1,), (2,)])
            await session.commit()
        return b.id

    batch_id = run_async(db_url, body)
    assert conn.execute("SELECT total FROM batches WHERE id = %s", (batch_id,)).fetchone()[0] == 2


# --- what conn= refuses -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [object(), "postgresql://localhost/db", 42])
def test_conn_refuses_what_it_cannot_write_through(bad):
    with pytest.raises(TypeError, match="psycopg Connection.*SQLAlchemy Session") as caught:
        record.using(conn=bad)
    assert type(bad).__name__ in str(caught.value)
    with pytest.raises(TypeError, match="psycopg Connection"):
        dj.batch(conn=bad)


def test_a_sqlalchemy_session_on_another_driver_is_refused(conn):
    other = sa.create_engine("sqlite://")
    with Session(other) as session:
        with pytest.raises(TypeError, match=r"sqlite\+pysqlite.*postgresql\+psycopg://"):
            record.using(conn=session).enqueue(1)
        assert session.execute(sa.text("SELECT 1")).scalar() == 1
    assert jobs(conn) == []


def test_sync_and_async_objects_are_not_mixed_up(engine, db_url, conn):
    with Session(engine) as session, psycopg.connect(db_url) as pg:
        for sync_obj in (session, pg, session.connection()):
            with pytest.raises(TypeError, match="is not async: use `task.using.*enqueue\\(.*AsyncSession"):
                asyncio.run(record.using(conn=sync_obj).enqueue_async(1))
            with pytest.raises(TypeError, match="is not async"):
                asyncio.run(record.using(conn=sync_obj).enqueue_many_async([(1,)]))

    async def body(engine):
        async with AsyncSession(engine) as session, engine.connect() as c:
            apg = await psycopg.AsyncConnection.connect(db_url)
            for async_obj in (session, c, apg):
                with pytest.raises(TypeError, match="is async: use `await task.using.*enqueue_async"):
                    record.using(conn=async_obj).enqueue(1)
                with pytest.raises(TypeError, match="is async"):
                    record.using(conn=async_obj).enqueue_many([(1,)])
                with pytest.raises(TypeError, match="is async"):
                    with dj.batch(conn=async_obj):
                        pass
            await apg.close()

    run_async(db_url, body)
    assert jobs(conn) == []
