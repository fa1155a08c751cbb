"""The claim cursors' probe (dj/cursors.py): the read of each queue from its head, for what no
NOTIFY announces, runs on the maintenance thread's connection, so that an idle worker's pickup of a
new job never waits for it; what it finds before the worker's position is claimed next, by a claim
from the moved-back position. And the bookkeeping: probes replace the claims' own reads from the
head while they keep coming; a read from the head that finds nothing keeps the last position."""

from __future__ import annotations

import threading

import psycopg
import pytest

import dj
from dj import cursors
from dj.cursors import HEAD, ClaimCursors
from dj.worker.maintenance import Maintenance
from tests.conftest import wait_for
from tests.support_jobs import record

HEAD_PARAMS = {"after_priority": [-32768], "after_micros": [None], "after_id": [None]}


def _at(pos):
    return {"after_priority": [pos[0]], "after_micros": [pos[1]], "after_id": [pos[2]]}


# --- the bookkeeping ----------------------------------------------------------------------------

@pytest.mark.no_database
def test_a_probe_moves_a_queue_back_only_to_a_job_before_its_position():
    c = ClaimCursors(["q", "r"])
    c.params()
    c.claimed({"q": (0, 100, 10), "r": (0, 100, 10)}, head=True, seconds=0.001)
    assert c.probed({"q": (0, 100, 12), "r": (0, 50, 3)}, 0.001)  # ready jobs: claim
    assert c.params()[0] == {"after_priority": [0, 0], "after_micros": [100, 50], "after_id": [10, 2]}
    assert not c.probed({}, 0.001)  # nothing ready anywhere: no need to wake the worker


@pytest.mark.no_database
def test_probes_replace_the_claims_timed_reads_from_the_head_until_they_stop(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cursors.time, "monotonic", lambda: now[0])
    c = ClaimCursors(["q"])
    assert c.params()[1]  # the first claim reads from the head: no position yet
    c.claimed({"q": (0, 1, 1)}, head=True, seconds=0.01)
    assert c.probe_due()
    for _ in range(10):  # a probe a second: the claims never go back to the head on a timer
        c.probed({"q": (0, 1, 5)}, 0.01)
        assert not c.probe_due()
        now[0] += 1.0
        assert c.probe_due()
        assert not c.params()[1]
    # A slow probe (an old snapshot) spaces the next one by PROBE_COST_FACTOR x its time, and tells
    # the notifier that reads from the head are no longer cheap.
    assert c.head_is_cheap(0.02)
    c.probed({}, 0.4)
    assert not c.head_is_cheap(0.02)
    now[0] += cursors.PROBE_COST_FACTOR * 0.4 - 0.1
    assert not c.probe_due() and not c.params()[1]
    # The probes stop (say the maintenance connection is down): the claims read from the head
    # themselves again, once they are PROBE_LATE_FACTOR intervals late.
    now[0] += cursors.PROBE_COST_FACTOR * 0.4 * (cursors.PROBE_LATE_FACTOR - 1) + 0.2
    assert c.params()[1]


@pytest.mark.no_database
def test_a_read_from_the_head_that_finds_nothing_keeps_the_last_position():
    c = ClaimCursors(["q", "r"])
    c.params()
    c.claimed({"q": (0, 100, 10), "r": (0, 100, 20)}, head=True, seconds=0.001)
    c.rescan()
    assert c.params() == ({"after_priority": [-32768, -32768], "after_micros": [None, None],
                           "after_id": [None, None]}, True)
    c.claimed({"r": (0, 100, 30)}, head=True, seconds=0.001)  # q had nothing ready
    # q goes back to where it was, not to the head: the next job's claim reads on from there.
    assert c.params() == ({"after_priority": [0, 0], "after_micros": [100, 100], "after_id": [10, 30]}, False)


@pytest.mark.no_database
def test_positions_show_the_next_claims_start_without_consuming_moves_back():
    c = ClaimCursors(["q"])
    assert c.positions() == HEAD_PARAMS
    c.params()
    c.claimed({"q": (0, 100, 10)}, head=True, seconds=0.001)
    assert c.positions() == _at((0, 100, 10))
    c.woken("q" + cursors.SEPARATOR + "0" + cursors.SEPARATOR + "50" + cursors.SEPARATOR + "7")
    assert c.positions() == _at((0, 50, 6))
    assert c.positions() == _at((0, 50, 6))
    assert c.params()[0] == _at((0, 50, 6))
    assert HEAD is None


# --- a real worker --------------------------------------------------------------------------------

class _Gate:
    """Holds the maintenance thread inside its probe, after the real read from the head, until
    opened: for the main loop, a read from the head that is still in progress."""

    def __init__(self, monkeypatch):
        self.entered, self.open = threading.Event(), threading.Event()
        self.probes = 0
        real = Maintenance.maybe_probe

        def maybe_probe(maintenance, conn):
            due = maintenance.worker._producer.cursors.probe_due()
            real(maintenance, conn)
            if due:
                self.probes += 1
                if self.probes >= 2:  # the first lets the worker settle
                    self.entered.set()
                    assert self.open.wait(60)

        monkeypatch.setattr(Maintenance, "maybe_probe", maybe_probe)


class _Claims:
    """Which of the worker's claims read from the head (cursors.params' second value)."""

    def __init__(self, worker: dj.Worker):
        self.head: list[bool] = []
        cur = worker._producer.cursors
        real = cur.params

        def params():
            result = real()
            self.head.append(result[1])
            return result

        cur.params = params  # type: ignore[method-assign]


def _runs(conn, marker: str) -> int:
    return conn.execute("SELECT count(*) FROM test_runs WHERE marker = %s", (marker,)).fetchone()[0]


def _start(db_url, queue: str) -> tuple[dj.Worker, threading.Thread]:
    worker = dj.Worker(queues=[queue], concurrency=2, database_url=db_url, heartbeat_interval=1.0)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return worker, thread


def test_an_idle_worker_picks_up_a_new_job_while_a_read_from_the_head_is_in_progress(conn, db_url, monkeypatch):
    gate = _Gate(monkeypatch)
    with psycopg.connect(db_url) as holder:
        # An old snapshot: every job drained from here on leaves dead index entries at the head.
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM jobs").fetchone()
        record.using(queue="probe").enqueue_many([(f"before-{i}",) for i in range(300)])
        worker, thread = _start(db_url, "probe")
        claims = _Claims(worker)
        try:
            wait_for(lambda: _runs(conn, "before-299") == 1, timeout=60, message="the first jobs to run")
            assert gate.entered.wait(30), "the probe never ran"
            # The probe is in progress (held at the gate). New jobs, one at a time, each on its
            # own: each is picked up, by a claim from the worker's position.
            claims.head.clear()
            for i in range(5):
                record.using(queue="probe").enqueue(f"new-{i}")
                wait_for(lambda: _runs(conn, f"new-{i}") == 1, timeout=30, message=f"new-{i} to run")
            assert not gate.open.is_set()
            assert claims.head and not any(claims.head), claims.head
        finally:
            gate.open.set()
            worker.stop()
            thread.join(30)
        holder.rollback()
    assert not thread.is_alive()


def test_a_job_that_no_notify_announced_before_the_position_is_found_by_the_probe(conn, db_url):
    record.using(queue="probe", priority=5).enqueue_many([(f"first-{i}",) for i in range(50)])
    worker, thread = _start(db_url, "probe")
    claims = _Claims(worker)
    try:
        wait_for(lambda: _runs(conn, "first-49") == 1, timeout=60, message="the first jobs to run")
        # A job of a lower priority number, written with no NOTIFY (as a job handed back or let go
        # without one): it sits before the worker's position, and only a read from the head sees it.
        claims.head.clear()
        conn.execute("INSERT INTO jobs (queue, task, args, priority) VALUES ('probe', %s, '[\"quiet\"]', 0)",
                     (record.name,))
        wait_for(lambda: _runs(conn, "quiet") == 1, timeout=30, message="the quiet job to run")
        # Claimed from the position the probe moved back, not by the claims' own read from the head.
        assert claims.head and not any(claims.head), claims.head
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_poll_reads_from_the_positions_once_reads_from_the_head_are_slow(conn, db_url):
    """Behind a transaction pooler without DJ_LISTEN_URL the notifier polls sql.POLL: from the head
    while that is cheap, from the claim positions once the probe found it slow (an old snapshot)."""
    from dj.worker.connection import Connector
    from dj.worker.notifier import Notifier

    first = record.using(queue="polled", priority=5).enqueue("first")
    pos = conn.execute("SELECT priority, (extract(epoch FROM run_at) * 1000000)::int8, id FROM jobs"
                       " WHERE id = %s", (first,)).fetchone()
    c = ClaimCursors(["polled"])
    c.params()
    c.claimed({"polled": pos}, head=True, seconds=0.001)  # as if the worker had claimed it
    c.probed({}, 1.0)  # a probe that took the server a second: reads from the head are slow
    stopping, woken = threading.Event(), threading.Event()
    notifier = Notifier(Connector(db_url, 300.0), ["polled"], stopping, on_jobs=woken.set,
                        on_settings=lambda payload: None, cursors=c,
                        poll_params={"min_priority": -32768, "max_priority": 32767})
    notifier.listen_url, notifier.poll_interval = None, 0.05
    thread = threading.Thread(target=notifier.run, daemon=True)
    thread.start()
    try:
        wait_for(woken.is_set, message="the notifier's first wake-up (it wakes the worker as it connects)")
        # It also sent the worker to the head (a NOTIFY may have been missed while it was away):
        # the worker's claim from the head, which finds the job it holds.
        c.params()
        c.claimed({"polled": pos}, head=True, seconds=0.001)
        # A job before the position (a lower priority number): a poll from the position does not
        # see it; it is the probe's to find.
        woken.clear()
        record.using(queue="polled", priority=0).enqueue("before")
        assert not woken.wait(1.0)
        assert c.positions()["after_id"] == [pos[2]]
        # A job after the position: the next poll finds it and moves nothing back.
        record.using(queue="polled", priority=5).enqueue("after")
        assert woken.wait(10)
        assert c.positions()["after_id"] == [pos[2]]
    finally:
        stopping.set()
        thread.join(10)
