"""Enqueueing from async code: enqueue_async and enqueue_many_async, on dj's async pool (one per
event loop) and inside the transaction of a caller's psycopg AsyncConnection."""

import asyncio
import threading

import psycopg
import pytest

import dj
from dj.cursors import parse_wake
from dj import db
from dj.task import COPY_AT
from tests.support_jobs import record


@dj.job(name="test.enqueue_async.coroutine")
async def coroutine_task(n: int) -> None:
    """Never run here: enqueueing a coroutine task is the same as any other."""


def run(coro):
    return asyncio.run(coro)


def test_enqueue_async_writes_the_same_row_as_enqueue(conn):
    async def main():
        return await record.using(queue="mail", priority=3).enqueue_async("m"), await coroutine_task.enqueue_async(1)

    sync_id = record.using(queue="mail", priority=3).enqueue("m")
    async_id, coroutine_task_id = run(main())
    coroutine_task_sync_id = coroutine_task.enqueue(2)  # either side enqueues either kind of task
    rows = conn.execute("SELECT id, task, queue, priority, args, kwargs, max_attempts FROM jobs ORDER BY id").fetchall()
    assert [r[1:] for r in rows] == [("test.record", "mail", 3, ["m"], {}, 25)] * 2 + [
        (coroutine_task.name, "default", 0, [n], {}, 25) for n in (1, 2)]
    assert [r[0] for r in rows] == [sync_id, async_id, coroutine_task_id, coroutine_task_sync_id]


def test_enqueue_many_async_keeps_order_and_uses_copy_for_big_batches(conn):
    n = COPY_AT + 200

    async def main():
        small = await record.enqueue_many_async([(1,), {"marker": 2}])
        big = await record.using(queue="bulk").enqueue_many_async([(i,) for i in range(n)])
        return small, big, await record.enqueue_many_async([])

    small, big, empty = run(main())
    assert empty == []
    assert conn.execute("SELECT args, kwargs FROM jobs WHERE id = ANY(%s) ORDER BY id", (small,)).fetchall() == [
        ([1], {}), ([], {"marker": 2})]
    assert len(big) == n and big == sorted(big)
    stored = conn.execute("SELECT id, args FROM jobs WHERE queue = 'bulk' ORDER BY id").fetchall()
    assert stored == [(job_id, [i]) for i, job_id in enumerate(big)]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == n + 2


def test_unique_jobs_async_return_the_holders_id(conn):
    async def main():
        first = await record.using(unique_key="k").enqueue_async(1)
        again = await record.using(unique_key="k").enqueue_async(2)
        many = await record.using(unique=True).enqueue_many_async([(5,), (5,), (6,)])
        return first, again, many

    first, again, many = run(main())
    assert again == first
    assert many[0] == many[1] != many[2]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3


class CopyRecordingCursor(psycopg.AsyncCursor):
    """A real cursor that notes each COPY statement run through it."""
    copies: list[str] = []

    def copy(self, statement, *args, **kwargs):
        CopyRecordingCursor.copies.append(str(statement))
        return super().copy(statement, *args, **kwargs)


def test_an_async_connection_keeps_the_job_in_its_transaction(db_url, conn):
    CopyRecordingCursor.copies.clear()

    async def main(commit: bool) -> list[int]:
        async with await psycopg.AsyncConnection.connect(db_url, cursor_factory=CopyRecordingCursor) as tx:
            ids = [await record.using(conn=tx).enqueue_async("tx"),
                   *await record.using(conn=tx).enqueue_many_async([(i,) for i in range(COPY_AT + 1)])]
            assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0  # not visible before commit
            await (tx.commit() if commit else tx.rollback())
            assert not tx.closed
        return ids

    run(main(commit=False))
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    ids = run(main(commit=True))
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == len(ids) == COPY_AT + 2
    assert [c.split(" (")[0] for c in CopyRecordingCursor.copies] == ["COPY jobs"] * 2  # the bulk path, both times


def test_async_enqueue_sends_one_notify_per_call_at_commit(db_url):
    async def main():
        await record.using(queue="mail").enqueue_async(1)
        await record.using(queue="reports").enqueue_many_async([(i,) for i in range(COPY_AT + 1)])

    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dj_jobs")
        run(main())
        payloads = [parse_wake(n.payload)[0] for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert payloads == ["mail", "reports"]


def test_a_batch_counts_jobs_enqueued_async(conn):
    async def main():
        async with dj.batch(on_complete=record, args=["done"]) as b:
            await record.enqueue_async(1)
            await record.enqueue_many_async([(2,), (3,)])
        return b.id

    batch_id = run(main())
    assert conn.execute("SELECT total FROM batches WHERE id = %s", (batch_id,)).fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM jobs WHERE batch_id = %s", (batch_id,)).fetchone()[0] == 3


def test_each_event_loop_gets_its_own_pool_and_a_closed_loops_pool_is_dropped(db_url, conn):
    loops = []

    async def main():
        loops.append(asyncio.get_running_loop())
        await record.enqueue_async("loop")
        return await db.async_pool()

    first = run(main())
    second = run(main())  # a new loop: the first pool's lock and tasks belong to a closed loop
    assert first is not second
    assert (db_url, loops[0]) not in db._async_pools and (db_url, loops[1]) in db._async_pools
    # Loops on other threads, at the same time, each with a pool of their own.
    results = []
    threads = [threading.Thread(target=lambda: results.append(run(main()))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({id(p) for p in results}) == 3
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 5

    async def close():
        await db.async_pool()
        await db.close_async_pools()
        return [k for k in db._async_pools if k[1] is asyncio.get_running_loop()]

    assert run(close()) == []


def test_async_paths_go_through_the_test_modes_seam(monkeypatch, conn):
    seen = []
    monkeypatch.setattr(dj.task, "_interceptor", lambda enqueuer, calls: seen.append((enqueuer.name, calls)) or
                        list(range(100, 100 + len(calls))))

    async def main():
        return (await record.enqueue_async(1), await record.using(unique=True).enqueue_async(2),
                await record.enqueue_many_async([(3,), (4,)]))

    assert run(main()) == (100, 100, [100, 101])
    assert seen == [("test.record", [((1,), {})]), ("test.record", [((2,), {})]),
                    ("test.record", [((3,), {}), ((4,), {})])]
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_bad_arguments_write_nothing_async(conn):
    async def main(call):
        await call

    with pytest.raises(TypeError):
        run(main(record.enqueue_async(object())))
    with pytest.raises(ValueError, match="pass a reference"):
        run(main(record.enqueue_many_async([(1,), ("x" * (dj.task.MAX_ARGS_BYTES + 1),)])))
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.no_database
def test_an_unreachable_database_is_one_clear_error_and_leaves_no_pool(monkeypatch):
    url = "postgresql://dj:secret@127.0.0.1:1/nowhere"
    monkeypatch.setattr(db, "_override", url)
    with pytest.raises(dj.DatabaseUnavailable, match=r"cannot connect to postgresql://dj:\*\*\*@127\.0\.0\.1:1/nowhere") \
            as caught:
        run(record.enqueue_async(1))
    assert "secret" not in str(caught.value)
    assert not [k for k in db._async_pools if k[0] == url]
