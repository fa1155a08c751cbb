"""Cron: each tick is enqueued exactly once, however many workers race for it; misfires coalesce."""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import dj.task
from dj import cron, job
from tests.conftest import wait_for

# An hour boundary two hours ago: ticks in the past, so their jobs are ready at once.
T0 = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
MIN = timedelta(minutes=1)


def _noop() -> None:
    pass


@pytest.fixture
def cron_task():
    """Make cron tasks in this process only (no worker knows them); unregistered afterwards."""
    made = []

    def make(expr: str = "* * * * *", name: str = "test.cron_minutely"):
        made.append(name)
        return job(name=name, queue="cron-test", cron=expr)(_noop)

    yield make
    for name in made:
        dj.task._registry.pop(name, None)


def jobs(conn) -> list[tuple]:
    return conn.execute("SELECT task, queue, run_at, args, kwargs FROM jobs ORDER BY run_at, id").fetchall()


def test_first_sight_marks_the_current_tick_then_each_tick_fires_once(conn, cron_task):
    t = cron_task()
    assert cron.fire_due(conn, T0 + 30 * timedelta(seconds=1), [t]) == []  # no catch-up for a new task
    assert conn.execute("SELECT last_tick, last_job_id FROM cron_runs").fetchone() == (T0, None)

    (fired,) = cron.fire_due(conn, T0 + MIN, [t])  # exactly on the boundary
    assert (fired.name, fired.tick, fired.skipped) == ("test.cron_minutely", T0 + MIN, 0)
    assert jobs(conn) == [("test.cron_minutely", "cron-test", T0 + MIN, [], {})]
    assert conn.execute("SELECT last_tick, last_job_id FROM cron_runs").fetchone() == (T0 + MIN, fired.job_id)

    assert cron.fire_due(conn, T0 + MIN + timedelta(seconds=59), [t]) == []
    assert cron.fire_due(conn, T0 + MIN, [t]) == []  # an earlier clock changes nothing
    assert len(jobs(conn)) == 1


def test_one_tick_raced_by_many_connections_is_enqueued_once(db_url, conn, cron_task):
    t = cron_task()
    cron.fire_due(conn, T0, [t])
    racers, ticks = 8, 15
    barrier = threading.Barrier(racers)
    fired: list[cron.Fired] = []
    errors: list[BaseException] = []

    def race(i: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                for n in range(1, ticks + 1):
                    barrier.wait(timeout=30)
                    # Each racer's clock is a little different, as on different hosts.
                    fired.extend(cron.fire_due(c, T0 + n * MIN + timedelta(milliseconds=37 * i), [t]))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert sorted(f.tick for f in fired) == [T0 + n * MIN for n in range(1, ticks + 1)]
    assert [row[2] for row in jobs(conn)] == [T0 + n * MIN for n in range(1, ticks + 1)]
    assert conn.execute("SELECT last_tick FROM cron_runs").fetchone()[0] == T0 + ticks * MIN


def test_first_sight_raced_by_many_connections(db_url, conn, cron_task):
    t = cron_task("*/5 * * * *", "test.cron_every_5m")
    barrier = threading.Barrier(6)
    results = []

    def race() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait(timeout=30)
            results.append(cron.fire_due(c, T0 + 7 * MIN, [t]))

    threads = [threading.Thread(target=race) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert results == [[]] * 6
    assert conn.execute("SELECT name, expr, last_tick FROM cron_runs").fetchall() == [
        ("test.cron_every_5m", "*/5 * * * *", T0 + 5 * MIN)]


def test_misfires_after_downtime_coalesce_into_the_latest_tick(conn, cron_task, caplog):
    t = cron_task()
    cron.fire_due(conn, T0 + timedelta(seconds=30), [t])
    # No worker ran from T0+30s to T0+7m10s: the ticks T0+1m .. T0+7m were all missed.
    (fired,) = cron.fire_due(conn, T0 + 7 * MIN + timedelta(seconds=10), [t])
    assert (fired.tick, fired.skipped, fired.previous) == (T0 + 7 * MIN, 6, T0)
    assert [row[2] for row in jobs(conn)] == [T0 + 7 * MIN]  # once, for the most recent tick
    assert "6 missed tick(s) skipped" in caplog.text
    assert cron.fire_due(conn, T0 + 7 * MIN + timedelta(seconds=50), [t]) == []
    (fired,) = cron.fire_due(conn, T0 + 8 * MIN, [t])
    assert (fired.tick, fired.skipped) == (T0 + 8 * MIN, 0)
    assert len(jobs(conn)) == 2


def test_the_tick_and_its_job_commit_together(conn, cron_task, monkeypatch):
    good, bad = cron_task("* * * * *", "test.cron_good"), cron_task("* * * * *", "test.cron_bad")
    cron.fire_due(conn, T0, [good, bad])
    real_enqueue = dj.task.Enqueuer.enqueue

    def enqueue(self, *args, **kwargs):
        if self.name == "test.cron_bad":
            raise RuntimeError("enqueue failed")
        return real_enqueue(self, *args, **kwargs)

    monkeypatch.setattr(dj.task.Enqueuer, "enqueue", enqueue)
    assert [f.name for f in cron.fire_due(conn, T0 + MIN, [good, bad])] == ["test.cron_good"]
    # The failed tick is not marked: the next heartbeat tries it again.
    assert dict(conn.execute("SELECT name, last_tick FROM cron_runs").fetchall()) == {
        "test.cron_good": T0 + MIN, "test.cron_bad": T0}
    monkeypatch.setattr(dj.task.Enqueuer, "enqueue", real_enqueue)
    assert [f.name for f in cron.fire_due(conn, T0 + MIN + timedelta(seconds=5), [good, bad])] == ["test.cron_bad"]
    assert sorted(r[0] for r in jobs(conn)) == ["test.cron_bad", "test.cron_good"]


def test_a_rolled_back_caller_transaction_leaves_neither(db_url, cron_task):
    t = cron_task()
    with psycopg.connect(db_url) as c:  # not autocommit: fire_due runs inside the caller's transaction
        cron.fire_due(c, T0, [t])
        c.commit()
        c.execute("SELECT 1")  # a transaction is open: fire_due's block becomes a savepoint in it
        assert len(cron.fire_due(c, T0 + MIN, [t])) == 1
        c.rollback()
        assert c.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        assert c.execute("SELECT last_tick FROM cron_runs").fetchone()[0] == T0


@pytest.mark.no_database
@pytest.mark.parametrize("expr", ["61 * * * *", "not a cron", "", "* * * *", "0 0 31 2 *"])
def test_invalid_expression_is_rejected_at_decoration(expr):
    with pytest.raises(ValueError, match="cron expression"):
        job(name="test.cron_invalid", cron=expr)(_noop)
    assert dj.task.lookup("test.cron_invalid") is None


@pytest.mark.no_database
def test_schedule_lists_the_next_run(cron_task):
    t = cron_task("*/5 * * * *", "test.cron_every_5m")
    (s,) = cron.schedule(T0 + 7 * MIN, [t])
    assert (s.name, s.expr, s.next_run) == ("test.cron_every_5m", "*/5 * * * *", T0 + 10 * MIN)
    assert "test.cron_every_5m" in [x.name for x in cron.schedule(T0)]  # registered ones by default


def test_three_real_workers_enqueue_each_tick_once(worker_process, cli, conn):
    """tests/support_jobs.py's test.cron_every_2s, with three `dj work` processes heartbeating every second."""
    env = {"DJ_TEST_CRON": "1"}
    workers = [worker_process("--queues", "cron-test", "--concurrency", "2", "--lock-timeout", "3", env=env)
               for _ in range(3)]

    def recorded() -> list[str]:
        return [r[0] for r in conn.execute("SELECT marker FROM test_runs WHERE marker LIKE 'cron:%'")]

    wait_for(lambda: len(set(recorded())) >= 3, timeout=30, message="three cron ticks run")
    for w in workers:
        w.send_signal(signal.SIGTERM)
    for w in workers:
        assert w.wait(30) == 0, w.log()

    ran = recorded()
    pending = [r[0] for r in conn.execute("SELECT run_at FROM jobs WHERE queue = 'cron-test'")]
    ticks = [datetime.fromisoformat(m.removeprefix("cron:")) for m in ran] + pending
    assert len(ticks) == len(set(ticks)), f"a tick was enqueued twice: {sorted(ticks)}"
    assert all(t.microsecond == 0 and t.second % 2 == 0 for t in ticks)
    last_tick, last_job = conn.execute("SELECT last_tick, last_job_id FROM cron_runs").fetchone()
    assert last_tick == max(ticks) and last_job is not None

    listing = cli("cron", "list", env={**env, "COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if "test.cron_every_2s" in x)
    assert "* * * * * */2" in line and "cron-test" in line and f"{last_tick:%Y-%m-%d %H:%M:%S}" in line
    assert str(last_job) in line
