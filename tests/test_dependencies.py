"""Dependencies: using(after=[...]) runs a job only after every listed job (or batch) succeeded, kills
it (down the chain) when one dies or is cancelled, and wakes it at once when the last one
completes. Real worker processes throughout; see docs/ARCHITECTURE.md, "Dependencies"."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import dj
from dj import admin
from dj.dependencies import BatchRef, UnknownDependency, split
from tests.conftest import wait_for
from tests.support_jobs import fail, record, sleep, until


def runs(conn) -> dict[str, tuple[datetime, int]]:
    """marker -> (when it was recorded, by which job)."""
    return {m: (at, job_id) for m, at, job_id in conn.execute("SELECT marker, at, job_id FROM test_runs")}


def state(conn, job_id: int) -> tuple[str, str | None]:
    row = admin.get_job(conn, job_id)
    return row["state"], row["last_error"]


def waiting(conn) -> int:
    return conn.execute(f"SELECT count(*) FROM jobs WHERE {admin.STATE_SQL['waiting']}").fetchone()[0]


def test_a_chain_runs_in_order_on_several_processes(conn, run_burst):
    a = sleep.enqueue(0.3, "a")
    b = sleep.using(after=[a]).enqueue(0.3, "b")
    c = sleep.using(after=[b]).enqueue(0.3, "c")
    assert [state(conn, j)[0] for j in (a, b, c)] == ["ready", "waiting", "waiting"]
    run_burst(("default",), 3, 2)
    r = runs(conn)
    assert r["a:end"][0] <= r["b:start"][0] and r["b:end"][0] <= r["c:start"][0]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM job_dependencies").fetchone()[0] == 0


def test_a_diamond_waits_for_both_branches(conn, run_burst):
    a = sleep.enqueue(0.2, "a")
    b = sleep.using(after=[a]).enqueue(0.5, "b")
    c = sleep.using(after=[a]).enqueue(0.1, "c")
    d = sleep.using(after=[b, c]).enqueue(0, "d")
    assert admin.get_job(conn, d)["waits_for"] == [{"job": b, "state": "waiting"}, {"job": c, "state": "waiting"}]
    run_burst(("default",), 2, 2)
    r = runs(conn)
    assert r["a:end"][0] <= min(r["b:start"][0], r["c:start"][0])
    assert max(r["b:end"][0], r["c:end"][0]) <= r["d:start"][0]
    assert sum(1 for m in r if m == "d:start") == 1


def test_two_dependencies_finishing_at_the_same_moment_release_the_job_once(conn, run_burst):
    # Each of B and C completes in its own process, in its own transaction, at the same instant:
    # one of them must see the other's dependency row gone (see dj_settle_dependents).
    for round_ in range(4):
        at = time.time() + 2.5
        b = until.enqueue(at, f"b{round_}")
        c = until.enqueue(at, f"c{round_}")
        record.using(after=[b, c]).enqueue(f"d{round_}")
    run_burst(("default",), 2, 1)
    done = [m for m, in conn.execute("SELECT marker FROM test_runs WHERE marker LIKE 'd%'")]
    assert sorted(done) == [f"d{i}" for i in range(4)]
    assert waiting(conn) == 0


def test_a_dead_dependency_kills_its_dependents_down_the_chain(conn, run_burst):
    x = fail.using(max_attempts=1).enqueue("x")
    ok = record.enqueue("ok")
    y = record.using(after=[x, ok]).enqueue("y")
    z = record.using(after=[y]).enqueue("z")
    run_burst(("default",), 2, 2)
    assert set(runs(conn)) == {"x", "ok"}
    assert state(conn, y) == ("dead", f"dependency job {x} is dead: ValueError: boom x")
    assert state(conn, z) == ("dead", f"dependency job {y} is dead: dependency job {x} is dead: ValueError: boom x")
    assert conn.execute("SELECT count(*) FROM job_dependencies").fetchone()[0] == 0
    # A dead job is still a dead dependency for a job enqueued later: it is dead at once.
    late = record.using(after=[x]).enqueue("late")
    assert state(conn, late) == ("dead", f"dependency job {x} is dead")


def test_a_retry_of_the_dead_dependency_does_not_revive_its_dependents(conn, cli, run_burst):
    x = fail.using(max_attempts=1).enqueue("x")
    y = record.using(after=[x]).enqueue("y")
    run_burst()
    assert cli("jobs", "retry", str(y)).returncode == 0  # the user's call: y runs, on its own
    run_burst()
    assert "y" in runs(conn)


def test_cancelling_a_job_in_the_middle_kills_what_waits_for_it(conn, cli, run_burst):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    a = record.using(run_at=later).enqueue("a")  # scheduled: still there to cancel
    b = record.using(after=[a]).enqueue("b")
    c = record.using(after=[b]).enqueue("c")
    d = record.using(after=[c]).enqueue("d")
    assert cli("jobs", "cancel", str(c)).returncode == 0  # the middle of the chain
    assert state(conn, d) == ("dead", f"dependency job {c} was cancelled")
    assert [r[0] for r in conn.execute("SELECT job_id FROM job_dependencies")] == [b]  # c's own row went
    assert cli("jobs", "cancel", str(a)).returncode == 0  # the head: b dies too
    assert state(conn, b) == ("dead", f"dependency job {a} was cancelled")
    run_burst()
    assert runs(conn) == {}


def test_a_batch_as_dependency_waits_for_the_whole_batch(conn, run_burst):
    with dj.batch() as b:
        sleep.enqueue_many([(0.4, "b1"), (0.1, "b2"), (0.2, "b3")])
    after_batch = sleep.using(after=[b]).enqueue(0, "fan-in")
    by_ref = record.using(after=[BatchRef(b.id)]).enqueue("by-ref")
    assert admin.get_job(conn, after_batch)["waits_for"] == [{"batch": b.id, "state": "running"}]
    run_burst(("default",), 3, 1)
    r = runs(conn)
    assert max(r[f"b{i}:end"][0] for i in (1, 2, 3)) <= r["fan-in:start"][0]
    assert "by-ref" in r
    # A finished batch: a dependent enqueued now runs at once.
    assert state(conn, record.using(after=[b]).enqueue("late"))[0] == "ready"


def test_a_batch_with_a_dead_job_kills_its_dependents(conn, run_burst):
    with dj.batch() as b:
        record.enqueue("fine")
        fail.using(max_attempts=1).enqueue("bad")
    d = record.using(after=[b]).enqueue("d")
    e = record.using(after=[d]).enqueue("e")
    run_burst(("default",), 2, 2)
    assert state(conn, d) == ("dead", f"dependency batch {b.id} finished with dead or cancelled jobs")
    assert state(conn, e)[0] == "dead"
    assert {"d", "e"}.isdisjoint(runs(conn))


def test_a_dead_dependent_counts_towards_its_own_batch(conn, run_burst):
    from tests.support_jobs import batch_done

    x = fail.using(max_attempts=1).enqueue("x")
    with dj.batch(on_complete=batch_done, args=["deps"]) as b:
        record.using(after=[x]).enqueue("in-batch")
    run_burst()
    run_burst()  # the callback, enqueued by the death that finished the batch
    assert conn.execute("SELECT succeeded, dead, finished_at IS NOT NULL FROM batches WHERE id = %s",
                        (b.id,)).fetchone() == (0, 1, True)
    assert "callback:deps:0/1/1" in runs(conn)


def test_the_race_between_an_enqueue_and_the_completion_of_its_dependency(conn, db_url, worker_process):
    """The enqueue locks A (open transaction); meanwhile A finishes and its worker's COMPLETE blocks
    on that lock, with a snapshot taken before the enqueue commits. After the commit, COMPLETE must
    still release the dependent, with no poll to rescue it."""
    worker_process("--concurrency", "1")
    a = sleep.enqueue(0.5, "a")
    wait_for(lambda: "a:start" in runs(conn), message="a to start")
    with psycopg.connect(db_url) as mine:
        d = record.using(conn=mine, after=[a]).enqueue("d")
        wait_for(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()[0] > 0, message="the worker's COMPLETE to wait for the enqueue's lock")
        mine.commit()
    committed = time.monotonic()
    wait_for(lambda: "d" in runs(conn), timeout=4, message="d to run (the poll interval is 5 s)")
    assert time.monotonic() - committed < 4
    wait_for(lambda: admin.list_jobs(conn) == [], message="d's completion")  # d records, then completes


def test_many_enqueues_racing_completions_leave_nothing_waiting(conn, worker_process):
    for _ in range(2):
        worker_process("--concurrency", "4")
    dependents = []
    for i in range(150):
        a = record.enqueue(f"a{i}")
        time.sleep(0.002 * (i % 5))
        dependents.append(record.using(after=[a]).enqueue(f"d{i}"))
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0, timeout=30,
             message="every dependent to run")
    assert sum(1 for m in runs(conn) if m.startswith("d")) == 150


def test_a_burst_worker_waits_for_a_dependency_running_elsewhere_without_spinning(conn, db_url, cli,
                                                                                  worker_process):
    other = worker_process("--queues", "other", "--concurrency", "1")
    a = sleep.using(queue="other").enqueue(3, "a")
    d = record.using(after=[a]).enqueue("d")
    wait_for(lambda: "a:start" in runs(conn), message="a to start on the other worker")
    commits = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    before = conn.execute(commits).fetchone()[0]
    result = cli("work", "--burst", "--queues", "default")
    assert result.returncode == 0, result.stderr
    r = runs(conn)
    assert r["a:end"][0] <= r["d"][0] and r["d"][1] == d
    # Waiting ~3 s on a NOTIFY is a handful of transactions; a busy loop would be thousands.
    time.sleep(1.2)  # the workers' statistics reach pg_stat_database within a second
    assert conn.execute(commits).fetchone()[0] - before < 300
    other.terminate()


def test_a_burst_worker_exits_when_nothing_can_release_a_waiting_job(conn, cli):
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    a = record.using(run_at=later).enqueue("a")
    d = record.using(after=[a]).enqueue("d")
    started = time.monotonic()
    assert cli("work", "--burst").returncode == 0
    assert time.monotonic() - started < 30
    assert state(conn, d)[0] == "waiting"


def test_enqueue_many_async_and_conn_take_after(conn, db_url, run_burst):
    a = record.enqueue("a")
    many = record.using(after=[a]).enqueue_many([("m1",), ("m2",)])

    async def go() -> list[int]:
        one = await record.using(after=[a]).enqueue_async("x1")
        more = await record.using(after=[a]).enqueue_many_async([("x2",)])
        return [one, *more]

    from_async = asyncio.run(go())
    with psycopg.connect(db_url) as mine:
        record.using(conn=mine, after=[a]).enqueue("rolled back")
        mine.rollback()
    assert waiting(conn) == 4
    assert conn.execute("SELECT count(*) FROM job_dependencies").fetchone()[0] == 4
    run_burst()
    assert set(runs(conn)) == {"a", "m1", "m2", "x1", "x2"}
    assert len(set(many + from_async)) == 4


def test_a_finished_dependency_is_satisfied_and_an_unknown_one_is_an_error(conn, run_burst):
    a = record.enqueue("a")
    run_burst()
    assert state(conn, record.using(after=[a]).enqueue("after a"))[0] == "ready"  # a succeeded
    with pytest.raises(UnknownDependency, match=r"job 999"):
        record.using(after=[a, 999]).enqueue("never")
    with pytest.raises(LookupError, match=r"batch 7"):
        record.using(after=[BatchRef(7)]).enqueue("never")
    assert conn.execute("SELECT count(*) FROM jobs WHERE args = '[\"never\"]'").fetchone()[0] == 0


def test_unique_jobs_with_after(conn):
    from tests.support_jobs import unique_record

    a = record.enqueue("a")
    first = unique_record.using(after=[a]).enqueue("u")
    assert unique_record.using(after=[a]).enqueue("u") == first
    assert conn.execute("SELECT count(*) FROM job_dependencies").fetchone()[0] == 1


def test_status_metrics_and_the_cli_show_waiting_jobs(conn, cli, db_url):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from dj.web import create_app

    a = record.enqueue("a")
    with dj.batch() as b:
        record.enqueue("b1")
    d = record.using(after=[a, b]).enqueue("d")
    doc = json.loads(cli("status", "--json").stdout)
    assert doc["totals"]["waiting"] == 1 and doc["totals"]["scheduled"] == 0 and doc["totals"]["ready"] == 2
    assert doc["queues"]["default"]["waiting"] == 1
    shown = cli("jobs", "show", str(d)).stdout
    assert f"waits_for: job {a} (ready), batch {b.id} (running)" in shown
    assert "state: waiting" in shown
    listed = cli("jobs", "list", "--state", "waiting").stdout
    assert f"│ {d} " in listed and "waiting" in listed
    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        assert 'dj_jobs{queue="default",state="waiting"} 1.0' in client.get("/metrics").text
        page = client.get(f"/jobs/{d}", headers={"Accept": "text/html"}).text
        assert f'<a href="/jobs/{a}">job {a}</a> (ready), batch {b.id} (running)' in page
        assert 'data-count="waiting"' in client.get("/", headers={"Accept": "text/html"}).text


def test_the_cli_enqueues_with_after(conn, cli):
    a = record.enqueue("a")
    result = cli("enqueue", "job", "test.record", "--args", '["d"]', "--after", str(a))
    assert result.returncode == 0, result.stderr
    assert waiting(conn) == 1
    bad = cli("enqueue", "job", "test.record", "--after", "424242")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "job 424242" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.no_database
def test_after_takes_job_ids_and_batches_only():
    assert split([3, 1, 3, BatchRef(2)]) == ((3, 1), (2,))
    assert record.using(after=None).options.after is None and record.using(after=[]).options.after is None
    for bad in (["1"], [True], [1.0], 5, "12"):
        with pytest.raises(TypeError):
            split(bad)
    with pytest.raises(ValueError, match="run_at"):
        record.using(after=[1], run_at=datetime.now(timezone.utc)).enqueue_many([("x",)])
