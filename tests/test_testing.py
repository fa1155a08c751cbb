"""dj's test mode (dj.testing): enqueues recorded in memory or run at once, with no database.

These tests ask for `dj_jobs` or `dj_inline` (or open a capture themselves and ask for `dj_jobs`
to say so), so tests/conftest.py gives them no database."""

import asyncio
import threading
from datetime import datetime, timedelta, timezone

import pytest

import dj
from dj import db, job, testing
from dj.dependencies import UnknownDependency

LOG: list = []


@job(name="tm.record", queue="tm")
def tm_record(marker, **extra) -> None:
    ctx = dj.current_job()
    LOG.append((marker, ctx.id if ctx else None, ctx.task if ctx else None))


@job(name="tm.chain")
def tm_chain(n: int) -> None:
    """Enqueues the next link, with a lower priority number, until n reaches 0."""
    LOG.append(("chain", n))
    if n > 0:
        tm_chain.using(priority=-n).enqueue(n - 1)


@job(name="tm.boom")
def tm_boom(marker) -> None:
    LOG.append(("boom", marker))
    raise ValueError(f"boom {marker}")


@job(name="tm.unique", unique=True)
def tm_unique(key, again: bool = False) -> None:
    LOG.append(("unique", key, dj.current_job().id))
    if again:  # its own key is held while it runs: this returns its own id
        LOG.append(("again", tm_unique.enqueue(key, again=True)))


@job(name="tm.progress")
def tm_progress() -> None:
    dj.current_job().progress(0.25, "a quarter")
    dj.current_job().progress(1.0)


@job(name="tm.async")
async def tm_async(marker) -> None:
    await asyncio.sleep(0)
    ctx = dj.current_job()
    LOG.append(("async", marker, ctx.id, asyncio.get_running_loop() is not None))


@job(name="tm.async_enqueuer")
async def tm_async_enqueuer(marker) -> None:
    await asyncio.sleep(0)
    tm_async.enqueue(f"{marker}+1")


@job(name="tm.forever")
def tm_forever() -> None:
    tm_forever.enqueue()


@job(name="tm.batch_done")
def tm_batch_done(label, batch) -> None:
    LOG.append(("callback", label, batch))
    dj.batches.record_result(batch["id"], {"label": label})


@pytest.fixture(autouse=True)
def _empty_log():
    LOG.clear()
    yield


# --- records -------------------------------------------------------------------------------------


def test_each_enqueue_is_recorded_with_its_resolved_options(dj_jobs):
    before = datetime.now(timezone.utc)
    first = tm_record.enqueue("a", colour="red")
    when = datetime.now(timezone.utc) + timedelta(hours=2)
    second = tm_record.using(queue="slow", priority=5, run_at=when, max_attempts=3, timeout=9).enqueue(("t", 1))
    many = tm_record.enqueue_many([("m1",), {"marker": "m2"}])
    by_name = dj.enqueue("tm.record", ["n"], priority=-3)
    assert [first, second, *many, by_name] == [1, 2, 3, 4, 5]
    assert [(j.id, j.task, j.args, j.kwargs, j.queue, j.priority) for j in dj_jobs.jobs] == [
        (1, "tm.record", ["a"], {"colour": "red"}, "tm", 0),
        (2, "tm.record", [["t", 1]], {}, "slow", 5),  # arguments as the worker gets them: JSON
        (3, "tm.record", ["m1"], {}, "tm", 0),
        (4, "tm.record", [], {"marker": "m2"}, "tm", 0),
        (5, "tm.record", ["n"], {}, "tm", -3),
    ]
    a, b = dj_jobs.jobs[:2]
    assert before <= a.run_at == a.enqueued_at <= datetime.now(timezone.utc)  # no run_at: now
    assert not a.scheduled and (a.max_attempts, a.timeout) == (25, None)
    assert b.run_at == when and b.scheduled and (b.max_attempts, b.timeout) == (3, 9)
    assert len(dj_jobs) == 5 and list(dj_jobs) == dj_jobs.jobs
    assert LOG == []  # nothing ran


def test_a_naive_run_at_is_read_as_local_time(dj_jobs):
    naive = datetime.now() + timedelta(minutes=10)
    tm_record.using(run_at=naive).enqueue("x")
    assert dj_jobs.jobs[0].run_at == naive.astimezone()
    with pytest.raises(TypeError, match="run_at must be a datetime"):
        tm_record.using(run_at=600).enqueue("x")


def test_filter_and_count_take_a_task_or_its_name_and_any_field(dj_jobs):
    tm_record.enqueue("a")
    tm_record.using(queue="other").enqueue("b")
    tm_chain.enqueue(0)
    assert [j.args for j in dj_jobs.filter(tm_record)] == [["a"], ["b"]]
    assert dj_jobs.filter("tm.record") == dj_jobs.filter(tm_record)
    assert dj_jobs.filter(tm_record.using(queue="x")) == dj_jobs.filter(tm_record)  # the name counts
    assert [j.args for j in dj_jobs.filter(queue="other")] == [["b"]]
    assert [j.task for j in dj_jobs.filter(args=(0,))] == ["tm.chain"]  # a tuple matches its JSON list
    assert dj_jobs.count(args=lambda a: a[0] in ("a", "b")) == 2
    assert dj_jobs.count(tm_record) == 2 and dj_jobs.count() == 3 and dj_jobs.count("nothing") == 0
    with pytest.raises(TypeError, match="no field 'colour'"):
        dj_jobs.filter(colour="red")


def test_assert_enqueued_returns_the_match_and_explains_a_miss(dj_jobs):
    job_id = tm_record.using(priority=2).enqueue("a", colour="red")
    found = dj_jobs.assert_enqueued(tm_record, args=["a"], kwargs={"colour": "red"}, queue="tm", priority=2)
    assert found.id == job_id
    assert dj_jobs.assert_enqueued("tm.record", count=1) is found
    dj_jobs.assert_not_enqueued(tm_chain)
    dj_jobs.assert_not_enqueued(tm_record, args=["b"])
    with pytest.raises(AssertionError) as miss:
        dj_jobs.assert_enqueued(tm_record, args=["b"])
    message = str(miss.value)
    assert "matching task='tm.record', args=['b'], found 0" in message
    assert "<job 1 tm.record args=['a'] kwargs={'colour': 'red'} queue='tm' priority=2>" in message
    with pytest.raises(AssertionError, match="expected 2 enqueued"):
        dj_jobs.assert_enqueued(tm_record, count=2)
    with pytest.raises(AssertionError, match="expected 0 enqueued"):
        dj_jobs.assert_not_enqueued(tm_record)
    with pytest.raises(ValueError, match="assert_not_enqueued"):
        dj_jobs.assert_enqueued(tm_record, count=0)


def test_run_at_checks_take_a_moment_a_delay_or_none(dj_jobs):
    when = datetime.now(timezone.utc) + timedelta(hours=1)
    tm_record.using(run_at=when).enqueue("later")
    tm_record.enqueue("now")
    dj_jobs.assert_enqueued(tm_record, args=["later"], run_at=when + timedelta(milliseconds=300))  # within 1 s
    dj_jobs.assert_enqueued(tm_record, args=["later"], run_at=timedelta(hours=1))  # a delay after the enqueue
    dj_jobs.assert_enqueued(tm_record, args=["now"], run_at=None)  # to run at once
    dj_jobs.assert_enqueued(tm_record, args=["later"], run_at=lambda t: t > datetime.now(timezone.utc))
    assert dj_jobs.count(run_at=when + timedelta(seconds=5)) == 0
    assert dj_jobs.count(run_at=when + timedelta(seconds=5), tolerance=timedelta(seconds=10)) == 1
    assert [j.args for j in dj_jobs.filter(scheduled=True)] == [["later"]]
    assert dj_jobs.count(run_at=timedelta(minutes=59)) == 0


def test_clear_forgets_everything_and_frees_unique_keys(dj_jobs):
    first = tm_unique.enqueue("k")
    tm_record.enqueue("a")
    dj_jobs.clear()
    assert dj_jobs.jobs == [] and len(dj_jobs) == 0
    assert tm_unique.enqueue("k") != first


# --- validation, as in production ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [object(), {1, 2}, float("nan"), b"bytes"])
def test_arguments_that_are_not_json_raise_type_error_and_record_nothing(dj_jobs, bad):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        tm_record.enqueue(bad)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        tm_record.enqueue_many([("fine",), (bad,)])
    with pytest.raises(TypeError, match="JSON-serialisable"):
        tm_record.enqueue("fine", extra=bad)
    assert dj_jobs.jobs == []


def test_arguments_over_the_size_limit_and_bad_priorities_are_refused(dj_jobs):
    big = "x" * (dj.task.MAX_ARGS_BYTES + 1)
    for enqueue in (lambda: tm_record.enqueue(big), lambda: tm_record.enqueue(marker=big),
                    lambda: tm_record.enqueue_many([("small",), (big,)])):
        with pytest.raises(ValueError, match="pass a reference"):
            enqueue()
    for priority in (40000, -40000, 1.5):
        with pytest.raises(ValueError, match="priority"):
            tm_record.using(priority=priority).enqueue("p")
    with pytest.raises(TypeError, match="unique_key names one job"):
        tm_record.using(unique_key="k").enqueue_many([("a",)])
    with pytest.raises(TypeError, match="unknown enqueue option"):
        tm_record.using(colour="red")
    assert dj_jobs.jobs == []
    tm_record.enqueue("x" * (dj.task.MAX_ARGS_BYTES // 2))  # under the limit: recorded
    assert len(dj_jobs) == 1


def test_a_held_unique_key_returns_the_holders_id(dj_jobs):
    first = tm_unique.enqueue("a")
    assert tm_unique.enqueue("a") == first
    assert tm_unique.enqueue("b") != first
    assert tm_record.using(unique_key="k1").enqueue("x") == tm_record.using(unique_key="k1").enqueue("y")
    ids = tm_unique.enqueue_many([("c",), ("a",), ("c",)])
    assert ids[1] == first and ids[0] == ids[2] and len(set(ids)) == 2
    assert [(j.args, j.unique_key) for j in dj_jobs.filter(tm_unique)] == [
        (["a"], 'tm.unique:[["a"],{}]'), (["b"], 'tm.unique:[["b"],{}]'), (["c"], 'tm.unique:[["c"],{}]')]
    assert dj_jobs.count() == 4


def test_a_unique_key_is_held_while_its_job_runs_and_free_after(dj_jobs):
    first = tm_unique.enqueue("k", again=True)
    assert dj_jobs.drain() == 1
    assert LOG == [("unique", "k", first), ("again", first)]
    assert tm_unique.enqueue("k") != first


# --- drain ---------------------------------------------------------------------------------------


def test_drain_runs_every_job_in_claim_order_scheduled_ones_too(dj_jobs):
    later = datetime.now(timezone.utc) + timedelta(days=1)
    soon = datetime.now(timezone.utc) + timedelta(minutes=1)
    tm_record.using(run_at=later).enqueue("p0-later")
    tm_record.enqueue("p0-first")
    tm_record.using(priority=5).enqueue("p5")
    tm_record.using(priority=-5).enqueue("p-5")
    tm_record.using(run_at=soon).enqueue("p0-soon")
    tm_record.enqueue("p0-second")
    assert dj_jobs.drain() == 6
    assert [m for m, _, _ in LOG] == ["p-5", "p0-first", "p0-second", "p0-soon", "p0-later", "p5"]
    assert [(job_id, task) for _, job_id, task in LOG] == [(j.id, j.task) for j in dj_jobs.performed]
    assert dj_jobs.jobs == [] and dj_jobs.drain() == 0


def test_drain_runs_the_jobs_that_jobs_enqueue(dj_jobs):
    tm_chain.enqueue(3)
    tm_record.using(priority=-1).enqueue("before the links")
    assert dj_jobs.drain() == 5
    # Each link has a lower priority number than anything waiting, so it runs next.
    assert LOG == [("before the links", 2, "tm.record"), ("chain", 3), ("chain", 2), ("chain", 1), ("chain", 0)]
    dj_jobs.assert_performed(tm_chain, count=4)
    dj_jobs.assert_performed(tm_chain, args=[0], priority=-1)


def test_drain_can_be_limited_to_a_task_or_a_queue(dj_jobs):
    tm_record.enqueue("a")
    tm_record.using(queue="mail").enqueue("b")
    tm_chain.enqueue(0)
    assert dj_jobs.drain(queue="mail") == 1 and LOG == [("b", 2, "tm.record")]
    assert dj_jobs.drain(tm_chain) == 1
    assert [j.args for j in dj_jobs.jobs] == [["a"]]


def test_a_jobs_exception_propagates_and_the_rest_wait_for_the_next_drain(dj_jobs):
    tm_record.enqueue("first")
    tm_boom.enqueue("x")
    tm_record.enqueue("after")
    with pytest.raises(ValueError, match="boom x"):
        dj_jobs.drain()
    assert [j.args for j in dj_jobs.jobs] == [["after"]]
    assert [(j.task, str(j.error)) for j in dj_jobs.failed] == [("tm.boom", "boom x")]
    assert dj_jobs.drain() == 1
    assert [j.args for j in dj_jobs.performed] == [["first"], ["after"]]


def test_a_job_of_an_unknown_task_fails_the_drain(dj_jobs):
    with dj.batch(on_complete="tm.no_such_task"):
        tm_record.enqueue("a")
    with pytest.raises(dj.DJError, match="unknown task 'tm.no_such_task'"):
        dj_jobs.drain()
    assert [j.task for j in dj_jobs.failed] == ["tm.no_such_task"]


def test_drain_stops_a_job_that_enqueues_itself_forever(dj_jobs):
    tm_forever.enqueue()
    with pytest.raises(RuntimeError, match="ran 50 jobs and more keep coming"):
        dj_jobs.drain(max_jobs=50)


def test_current_job_describes_the_drained_job_and_progress_is_recorded(dj_jobs):
    job_id = tm_record.enqueue("ctx")
    tm_progress.enqueue()
    assert dj.current_job() is None
    dj_jobs.drain()
    assert LOG == [("ctx", job_id, "tm.record")]
    assert dj_jobs.performed[1].progress == [(0.25, "a quarter"), (1.0, "")]
    assert dj.current_job() is None


def test_coroutine_jobs_run_in_drain_on_an_event_loop(dj_jobs):
    tm_async.enqueue("one")
    tm_async_enqueuer.enqueue("two")
    assert dj_jobs.drain() == 3
    assert LOG == [("async", "one", 1, True), ("async", "two+1", 3, True)]


def test_drain_async_awaits_coroutine_jobs_on_the_running_loop(dj_jobs):
    async def main():
        tm_async.enqueue("a")
        tm_record.enqueue("sync")
        tm_async_enqueuer.enqueue("b")
        return await dj_jobs.drain_async()

    assert asyncio.run(main()) == 4
    assert LOG == [("async", "a", 1, True), ("sync", 2, "tm.record"), ("async", "b+1", 4, True)]


def test_drain_called_inside_a_running_loop_still_runs_coroutine_jobs(dj_jobs):
    async def main():
        tm_async.enqueue("inside")
        return dj_jobs.drain()  # a sync call from async code: the job gets a loop in a thread

    assert asyncio.run(main()) == 1
    assert LOG == [("async", "inside", 1, True)]


def test_async_enqueues_are_captured_and_drained_alike(dj_jobs):
    async def main():
        first = await tm_async.enqueue_async("a")
        assert await tm_async.enqueue_many_async([("b",), ("c",)]) == [first + 1, first + 2]
        await tm_record.using(priority=-1).enqueue_async("sync task, async enqueue")
        return await dj_jobs.drain_async()

    assert asyncio.run(main()) == 4
    assert [entry[0] if entry[0] != "async" else entry[1] for entry in LOG] == [
        "sync task, async enqueue", "a", "b", "c"]


def test_an_enqueue_in_the_callers_transaction_is_captured_without_touching_it(dj_jobs):
    """conn= a SQLAlchemy Session on psycopg, whose engine points where nothing listens: the job is
    recorded and no connection is ever made. On another driver, the same TypeError as production."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import Session

    nowhere = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    with Session(nowhere) as session:
        tm_record.using(conn=session).enqueue("in a transaction")
        assert not session.in_transaction()
    with Session(nowhere) as session:
        tm_record.using(conn=session).enqueue_many([("many",)])

    async def main():
        engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
        async with AsyncSession(engine) as session:
            await tm_record.using(conn=session).enqueue_async("async, in a transaction")
        await engine.dispose()

    asyncio.run(main())
    assert [j.args for j in dj_jobs.jobs] == [["in a transaction"], ["many"], ["async, in a transaction"]]
    with Session(create_engine("sqlite://")) as other:
        with pytest.raises(TypeError, match="postgresql\\+psycopg"):
            tm_record.using(conn=other).enqueue("x")
    with pytest.raises(TypeError, match="conn= takes"):
        tm_record.using(conn=object())
    assert len(dj_jobs.jobs) == 3


def test_a_connection_of_the_wrong_kind_is_refused_as_in_production(dj_jobs):
    """An AsyncSession given to enqueue() (or a Session to enqueue_async()) is the TypeError the
    real path raises, so a test catches the bug; nothing is recorded and no connection is made."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    from sqlalchemy.orm import Session

    async_engine = create_async_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing")
    async_session = AsyncSession(async_engine)
    with pytest.raises(TypeError, match="is async: use `await task.using"):
        tm_record.using(conn=async_session).enqueue("x")
    with pytest.raises(TypeError, match="is async"):
        tm_record.using(conn=async_session).enqueue_many([("x",)])
    with pytest.raises(TypeError, match="is async"):
        tm_unique.using(conn=async_session).enqueue("x")

    async def main():
        with Session(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/nothing")) as session:
            with pytest.raises(TypeError, match="is not async: use `task.using"):
                await tm_record.using(conn=session).enqueue_async("x")
            with pytest.raises(TypeError, match="is not async"):
                await tm_record.using(conn=session).enqueue_many_async([("x",)])
        await async_session.close()
        await async_engine.dispose()

    asyncio.run(main())
    assert dj_jobs.jobs == []


@pytest.mark.parametrize("args, kwargs", [(["a\x00b"], {}), ([], {"k": ["\x00"]}), ([{"key\x00": 1}], {})])
def test_a_nul_character_is_refused_as_in_production(dj_jobs, args, kwargs):
    """PostgreSQL's jsonb cannot store NUL; the real path refuses it with this ValueError before it
    writes (test_enqueue.py), and so does the test mode. A backslash followed by "u0000" is fine."""
    with pytest.raises(ValueError, match="NUL character"):
        tm_record.enqueue(*args, **kwargs)
    with pytest.raises(ValueError, match="NUL character"):
        tm_record.enqueue_many([("fine",), kwargs or tuple(args)])
    assert dj_jobs.jobs == []
    tm_record.enqueue("\\u0000")
    assert dj_jobs.jobs[0].args == ["\\u0000"]


# --- inline --------------------------------------------------------------------------------------


def test_inline_runs_each_job_at_once_in_the_caller(dj_inline):
    job_id = tm_record.enqueue("now")
    assert LOG == [("now", job_id, "tm.record")]
    tm_chain.enqueue(2)  # the jobs it enqueues run at once too, inside it
    assert LOG[1:] == [("chain", 2), ("chain", 1), ("chain", 0)]
    tm_async.enqueue("async")
    assert LOG[-1][:2] == ("async", "async")
    assert dj_inline.jobs == [] and len(dj_inline.performed) == 5


def test_inline_lets_the_jobs_exception_propagate(dj_inline):
    with pytest.raises(ValueError, match="boom now"):
        tm_boom.enqueue("now")
    assert [j.task for j in dj_inline.failed] == ["tm.boom"]


def test_inline_still_validates(dj_inline):
    with pytest.raises(TypeError):
        tm_record.enqueue(object())
    assert LOG == []


def test_inline_from_async_code_runs_coroutine_jobs_too(dj_inline):
    async def main():
        tm_async.enqueue("from a coroutine")

    asyncio.run(main())
    assert LOG[0][:2] == ("async", "from a coroutine")


# --- batches -------------------------------------------------------------------------------------


def test_a_batch_calls_back_once_its_jobs_have_run(dj_jobs):
    with dj.batch(on_complete=tm_batch_done, args=["b1"]) as b:
        tm_record.enqueue_many([("a",), ("b",)])
        tm_boom.enqueue("c")
    assert b.total == 3 and [j.batch_id for j in dj_jobs.jobs] == [b.id] * 3
    with pytest.raises(ValueError):
        dj_jobs.drain()  # the failing job: it counts as dead
    dj_jobs.drain()
    summary = {"id": b.id, "total": 3, "succeeded": 2, "dead": 1}
    assert LOG[-1] == ("callback", "b1", summary)
    dj_jobs.assert_performed(tm_batch_done, args=["b1"], kwargs={"batch": summary})
    assert dj_jobs.batch_results == {b.id: {"label": "b1"}}


def test_a_batch_in_inline_mode_calls_back_when_it_closes(dj_inline):
    with dj.batch(on_complete=tm_batch_done, args=["inline"]) as b:
        tm_record.enqueue("a")
        assert [entry[0] for entry in LOG] == ["a"]
    assert LOG[-1] == ("callback", "inline", {"id": b.id, "total": 1, "succeeded": 1, "dead": 0})


def test_jobs_enqueued_by_a_batchs_job_do_not_join_the_batch(dj_jobs):
    with dj.batch(on_complete=tm_batch_done, args=["outer"]) as b:
        tm_chain.enqueue(1)
    dj_jobs.drain()
    callback = [entry for entry in LOG if entry[0] == "callback"]
    assert callback == [("callback", "outer", {"id": b.id, "total": 1, "succeeded": 1, "dead": 0})]
    assert [j.batch_id for j in dj_jobs.performed] == [b.id, None, None]


# --- scope ---------------------------------------------------------------------------------------


def test_captures_nest_and_must_exit_in_order(dj_jobs):
    tm_record.enqueue("outer")
    with testing.capture() as inner:
        tm_record.enqueue("inner")
    tm_record.enqueue("outer again")
    assert [j.args for j in inner.jobs] == [["inner"]]
    assert [j.args for j in dj_jobs.jobs] == [["outer"], ["outer again"]]

    first, second = testing.capture(), testing.inline()
    first.__enter__()
    second.__enter__()
    with pytest.raises(RuntimeError, match="reverse order"):
        first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    first.__exit__(None, None, None)
    tm_record.enqueue("outer at the end")
    assert len(dj_jobs.jobs) == 3


def test_enqueues_from_other_threads_are_captured(dj_jobs):
    threads = [threading.Thread(target=lambda i=i: [tm_record.enqueue(f"{i}-{n}") for n in range(50)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(dj_jobs.jobs) == 200 and {j.id for j in dj_jobs.jobs} == set(range(1, 201))


def test_no_database_is_touched(dj_jobs, monkeypatch):
    """With dj pointed at an address where nothing listens, an enqueue fails outside the test mode
    and works inside it, batches and draining included."""
    monkeypatch.setattr(dj.task, "_interceptor", None)  # outside dj_jobs' capture, for the contrast
    monkeypatch.setattr(dj.batches, "_recorder", None)
    nowhere = "postgresql://nobody@127.0.0.1:1/nothing"
    monkeypatch.setenv("DJ_DATABASE_URL", nowhere)
    monkeypatch.setattr(db, "_override", None)
    monkeypatch.setattr(db, "_pools", {})
    assert db.database_url() == nowhere
    with testing.capture() as jobs:
        with dj.batch(on_complete=tm_batch_done, args=["offline"]):
            tm_record.enqueue("a")
            tm_unique.enqueue_many([("b",), ("b",)])
        tm_progress.enqueue()
        tm_async.enqueue("c")
        assert jobs.drain() == 5
    with testing.inline():
        tm_record.enqueue("d")
    assert ("d", 1, "tm.record") in LOG
    with pytest.raises(dj.DatabaseUnavailable, match="127.0.0.1:1"):
        tm_record.enqueue("outside the test mode")
    with pytest.raises(dj.DatabaseUnavailable):
        with dj.batch():
            pass


# --- after= in the test mode: the order and the deaths production gives -------------------------

@pytest.mark.no_database
def test_drain_runs_dependents_after_what_they_wait_for_and_kills_those_of_a_failure():
    @dj.job(name="test.testing_note")
    def record(marker: str) -> str:
        return marker

    @dj.job(name="test.testing_fail")
    def fail(marker: str) -> None:
        raise ValueError(f"boom {marker}")

    with dj.testing.capture() as jobs:
        a = record.using(priority=5).enqueue("a")
        b = record.using(after=[a], priority=-5).enqueue("b")  # a better priority, but it waits for a
        with dj.batch() as batch:
            c1 = record.enqueue("c1")
            record.enqueue("c2")
        d = record.using(after=[b, batch], priority=-9).enqueue("d")
        bad = fail.enqueue("bad")
        e = record.using(after=[bad]).enqueue("e")
        f = record.using(after=[e]).enqueue("f")
        with pytest.raises(UnknownDependency, match="job 999"):
            record.using(after=[999]).enqueue("never")
        # c1, c2 (priority 0) and a (5) are ready; b (-5) once a has run; d (-9) once b and the batch.
        assert jobs.drain(task=record) == 5
        assert [r.args[0] for r in jobs.performed] == ["c1", "c2", "a", "b", "d"]
        assert {r.args[0] for r in jobs.jobs} == {"bad", "e", "f"}  # e and f wait for bad
        with pytest.raises(ValueError, match="boom bad"):
            jobs.drain()  # bad raises; its dependents then die down the chain, never run
        assert jobs.drain() == 0 and jobs.jobs == []
        dead = {r.id: str(r.error) for r in jobs.failed}
        assert dead[e] == f"dependency job {bad} is dead" and dead[f] == f"dependency job {e} is dead"
        with pytest.raises(dj.JobDead, match=f"dependency job {bad} is dead"):
            jobs.result(e)
        assert jobs.performed[-1].id == d and jobs.performed[0].id == c1


@pytest.mark.no_database
def test_inline_runs_a_dependent_once_the_job_it_waits_for_has_returned():
    from dj import current_job

    order: list[str] = []

    @dj.job(name="test.testing_chain")
    def chain(step: str) -> None:
        if step == "first":
            # Enqueued while `first` runs, it must not start before `first` has returned.
            chain.using(after=[current_job().id]).enqueue("second")
        order.append(step)

    with dj.testing.inline() as jobs:
        chain.enqueue("first")
        assert order == ["first", "second"] and len(jobs.performed) == 2
