"""Workers vacuum jobs themselves (dj/vacuum.py): one at a time, elected by a lease row (no session
state), not while an old snapshot would make it useless; and a worker warns once about an old
snapshot. Real server, real worker processes."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from dj import vacuum
from tests.conftest import wait_for


@pytest.fixture(autouse=True)
def no_autovacuum(conn):
    """As on a server where autovacuum is off, or naps for a minute: the embedded server's 1 s nap
    would otherwise clean up before the code under test does."""
    conn.execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")
    yield
    conn.execute("ALTER TABLE jobs RESET (autovacuum_enabled)")


def _dead_rows(conn, n: int) -> None:
    """n dead row versions in jobs, counted by pg_stat once the session that made them ends."""
    conn.execute(f"INSERT INTO jobs (queue, task) SELECT 'vac', 'test.record' FROM generate_series(1, {n})")
    conn.execute("DELETE FROM jobs WHERE queue = 'vac'")


def _stat_dead(conn) -> int:
    return conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass").fetchone()[0]


def test_one_worker_at_a_time_takes_the_chore_and_only_when_it_is_due(db_url):
    with psycopg.connect(db_url, autocommit=True) as maker:
        vacuum.prepare(maker)
        _dead_rows(maker, 3000)
    with psycopg.connect(db_url, autocommit=True) as probe:
        wait_for(lambda: _stat_dead(probe) >= 3000, timeout=20, message="pg_stat counts the dead rows")
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(4)]
    try:
        taken: list = []
        barrier = threading.Barrier(len(conns))

        def race(i: int) -> None:
            barrier.wait()
            taken.append((i, vacuum.take(conns[i], f"w{i}", min_dead=1000, scale=0)))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [i for i, dead in taken if dead is not None]
        assert len(taken) == 4 and len(winners) == 1, taken
        winner = winners[0]
        assert vacuum.take(conns[winner], "late", min_dead=1000, scale=0) is None  # the lease is held
        assert vacuum.run(conns[winner], f"w{winner}") >= 0
        row = conns[0].execute("SELECT holder, runs, dead_after, lease_until <= now() FROM maintenance"
                               " WHERE name = 'vacuum jobs'").fetchone()
        assert row[0] == f"w{winner}" and row[1] == 1 and row[3]
        assert _stat_dead(conns[0]) < 3000 and conns[0].execute(
            "SELECT last_vacuum IS NOT NULL FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass").fetchone()[0]
        # free, but not due: the dead rows are gone
        assert vacuum.take(conns[1], "w1", min_dead=1000, scale=0) is None
    finally:
        for c in conns:
            c.close()


def test_no_vacuum_while_a_snapshot_older_than_the_last_one_holds_the_rows(db_url, conn):
    vacuum.prepare(conn)
    with psycopg.connect(db_url) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM jobs").fetchone()
        # The first run after the snapshot may still free what died before it.
        assert vacuum.maybe_vacuum(conn, "w", min_dead=0, scale=0) is not None
        with psycopg.connect(db_url, autocommit=True) as maker:
            _dead_rows(maker, 3000)
        wait_for(lambda: _stat_dead(conn) >= 3000, timeout=20, message="pg_stat counts the dead rows")
        # Everything that died since is still needed by the snapshot: another run would free nothing.
        assert vacuum.take(conn, "w", min_dead=1000, scale=0) is None
    assert vacuum.take(conn, "w", min_dead=1000, scale=0) is not None  # the snapshot is gone


def test_a_running_worker_vacuums_jobs_when_dead_rows_pile_up(db_url, conn, worker_process):
    with psycopg.connect(db_url, autocommit=True) as maker:
        _dead_rows(maker, vacuum.VACUUM_MIN_DEAD + 20_000)
    wait_for(lambda: _stat_dead(conn) > vacuum.VACUUM_MIN_DEAD, timeout=20, message="pg_stat counts the dead rows")
    worker_process("--queues", "elsewhere")
    wait_for(lambda: conn.execute("SELECT coalesce(max(runs), 0) FROM maintenance").fetchone()[0] >= 1,
             timeout=30, message="a vacuum by the worker")
    assert _stat_dead(conn) < vacuum.VACUUM_MIN_DEAD


def test_a_worker_warns_once_per_old_snapshot(db_url, worker_process):
    w = worker_process("--queues", "elsewhere", env={"DJ_SNAPSHOT_WARN_AFTER": "1", "DJ_LOCK_TIMEOUT": "3"})
    w.wait_for_log("started")

    def hold(app: str):
        holder = psycopg.connect(db_url, application_name=app)
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM jobs").fetchone()
        return holder

    first = hold("long report")
    w.wait_for_log("holds back vacuum of jobs")
    time.sleep(3)  # three more heartbeats with the same old snapshot: no more lines
    assert w.log().count("holds back vacuum of jobs") == 1
    assert f"pid {first.info.backend_pid} (long report)" in w.log()
    first.close()
    w.wait_for_log("is gone")
    second = hold("another report")
    wait_for(lambda: w.log().count("holds back vacuum of jobs") == 2, timeout=20, message="a second warning")
    second.close()
    assert "Traceback" not in w.log()
