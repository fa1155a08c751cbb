"""Enqueueing through the Python API: rows, options, transactions, validation and NOTIFY."""

import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

import dj
from dj.cursors import parse_wake
from dj import job
from tests.support_jobs import record, unique_record


def test_enqueue_writes_one_row_with_the_task_defaults(conn):
    job_id = record.enqueue("m")
    row = conn.execute("SELECT task, queue, priority, args, kwargs, attempts, max_attempts, locked_by, failed_at"
                       " FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert row == ("test.record", "default", 0, ["m"], {}, 0, 25, None, None)


def test_using_overrides_queue_priority_and_run_at(conn):
    when = datetime.now(timezone.utc) + timedelta(minutes=5)
    job_id = record.using(queue="slow", priority=5, run_at=when).enqueue(7)
    queue, priority, run_at = conn.execute("SELECT queue, priority, run_at FROM jobs WHERE id = %s",
                                           (job_id,)).fetchone()
    assert (queue, priority) == ("slow", 5)
    assert abs((run_at - when).total_seconds()) < 0.001


def test_enqueue_many_is_one_statement_and_keeps_order(conn):
    ids = record.enqueue_many([(1,), (2,), {"marker": 3}])
    assert ids == sorted(ids) and len(ids) == 3
    rows = conn.execute("SELECT args, kwargs FROM jobs ORDER BY id").fetchall()
    assert rows == [([1], {}), ([2], {}), ([], {"marker": 3})]
    assert record.enqueue_many([]) == []


# Enqueue's checks come before any round trip: with no database to reach, a refused enqueue
# raises its own error (so it wrote nothing), and an accepted one goes on to fail to connect.


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), b"bytes"])
def test_arguments_that_are_not_json_raise_type_error_and_write_nothing(unreachable_database, bad):
    with pytest.raises(TypeError):
        record.enqueue(bad)
    with pytest.raises(TypeError):
        record.enqueue_many([(1,), (bad,)])
    with pytest.raises(TypeError):
        unique_record.enqueue(bad)


def test_arguments_over_the_size_limit_are_refused_and_write_nothing(unreachable_database):
    big = "x" * (dj.task.MAX_ARGS_BYTES + 1)
    with pytest.raises(ValueError, match="pass a reference"):
        record.enqueue(big)
    with pytest.raises(ValueError, match="pass a reference"):
        record.enqueue(marker=big)
    with pytest.raises(ValueError, match="pass a reference"):
        record.enqueue_many([(1,), (big,)])
    with pytest.raises(dj.DatabaseUnavailable):
        record.enqueue("x" * (dj.task.MAX_ARGS_BYTES // 2))  # under the limit: accepted


def test_a_nul_character_is_refused_before_any_io(unreachable_database):
    """PostgreSQL's jsonb cannot store NUL (it would raise UntranslatableCharacter at the INSERT);
    dj refuses it before any I/O, with the ValueError the test mode raises too (test_testing.py)."""
    with pytest.raises(ValueError, match="NUL character"):
        record.enqueue("a\x00b")
    with pytest.raises(ValueError, match="NUL character"):
        record.enqueue_many([(1,), ({"k\x00": 1},)])
    with pytest.raises(ValueError, match="NUL character"):
        asyncio.run(record.enqueue_async(marker="\x00"))


def test_a_backslash_before_u0000_is_stored_as_it_is(conn):
    job_id = record.enqueue("\\u0000")
    assert conn.execute("SELECT args FROM jobs WHERE id = %s", (job_id,)).fetchone()[0] == ["\\u0000"]


def test_enqueue_in_a_rolled_back_transaction_leaves_no_job(db_url, conn):
    with psycopg.connect(db_url) as tx:
        record.using(conn=tx).enqueue("ghost")
        record.using(conn=tx).enqueue_many([("ghost2",)])
        assert tx.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2  # visible inside
        tx.rollback()
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_enqueue_in_a_committed_transaction_appears_at_commit(db_url, conn):
    with psycopg.connect(db_url) as tx:
        job_id = record.using(conn=tx).enqueue("real")
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # not yet committed
        tx.commit()
    assert conn.execute("SELECT id FROM jobs").fetchone()[0] == job_id


def test_every_enqueue_call_sends_one_notify_with_the_queue(db_url):
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dj_jobs")
        one = record.using(queue="mail", priority=3).enqueue(1)
        many = record.using(queue="reports").enqueue_many([(i,) for i in range(50)])
        notes = [parse_wake(n.payload) for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert [queue for queue, _ in notes] == ["mail", "reports"]
    # Each also says where its first job sits in claim order (priority, run_at in us, id), so that a
    # worker reading from a remembered position knows whether to move back (dj/cursors.py).
    with psycopg.connect(db_url) as conn:
        for (_, at), job_id in zip(notes, (one, min(many))):
            assert at == conn.execute("SELECT priority, (extract(epoch FROM run_at) * 1000000)::int8, id"
                                      " FROM jobs WHERE id = %s", (job_id,)).fetchone()


def test_a_rolled_back_enqueue_notifies_nobody(db_url):
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dj_jobs")
        with psycopg.connect(db_url) as tx:
            record.using(conn=tx).enqueue(1)
            tx.rollback()
        assert list(listener.notifies(timeout=0.5)) == []


@pytest.mark.no_database
def test_name_defaults_to_module_and_function():
    @job(queue="q9")
    def some_function():
        pass

    assert some_function.name == f"{__name__}.test_name_defaults_to_module_and_function.<locals>.some_function"
    assert dj.task.lookup(some_function.name) is some_function


@pytest.mark.no_database
def test_enqueue_by_name_refuses_unknown_tasks():
    with pytest.raises(dj.DJError, match="unknown task 'missing.task'"):
        dj.enqueue("missing.task")


@pytest.mark.parametrize("priority", [40000, -40000, 1.5])
def test_priority_out_of_range_is_refused(unreachable_database, priority):
    with pytest.raises(ValueError):
        record.using(priority=priority).enqueue(1)
    with pytest.raises(ValueError):
        record.using(priority=priority).enqueue_many([(1,)])


def test_bulk_enqueue_by_copy_keeps_order_options_and_sends_one_notify(db_url, conn):
    from dj.task import COPY_AT

    when = datetime.now(timezone.utc) + timedelta(minutes=3)
    n = COPY_AT + 500
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dj_jobs")
        with dj.batch() as b:
            ids = record.using(queue="bulk", priority=4, run_at=when, timeout=9).enqueue_many([(i,) for i in range(n)])
        payloads = [parse_wake(x.payload) for x in listener.notifies(timeout=1.0, stop_after=2)]
    assert [queue for queue, _ in payloads] == ["bulk"]
    # Where the first job sits, as an INSERT's NOTIFY says, so that workers reading from their
    # positions do not go back to the head of the queue for it (dj/cursors.py).
    assert payloads[0][1] == conn.execute("SELECT priority, (extract(epoch FROM run_at) * 1000000)::int8, id"
                                          " FROM jobs WHERE id = %s", (ids[0],)).fetchone()
    assert len(ids) == n and ids == sorted(ids) and b.total == n
    rows = conn.execute("SELECT id, args, queue, priority, run_at, timeout, batch_id FROM jobs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ids
    assert [r[1] for r in rows] == [[i] for i in range(n)]
    assert {(r[2], r[3], r[5], r[6]) for r in rows} == {("bulk", 4, 9.0, b.id)}
    assert all(abs((r[4] - when).total_seconds()) < 0.001 for r in rows)
    # COPY's ids come from the identity column's own sequence: the next job follows them.
    assert record.enqueue("after") > ids[-1]
    assert record.enqueue_many([(i,) for i in range(n)])[0] > ids[-1]


def test_bulk_enqueue_by_copy_in_a_rolled_back_transaction_leaves_nothing(db_url, conn):
    with psycopg.connect(db_url) as tx:
        record.using(conn=tx).enqueue_many([(i,) for i in range(1500)])
        tx.rollback()
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_a_pooled_connection_given_back_inside_a_transaction_is_rolled_back(conn):
    with dj.connection() as pooled:
        pooled.execute("BEGIN")
        record.using(conn=pooled).enqueue("never committed")
    with dj.connection() as again:
        assert again.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert again.autocommit
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
