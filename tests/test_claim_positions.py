"""Claims that start after the worker's last claimed job instead of the claim index's head
(dj/cursors.py, sql.CLAIM): the bookkeeping, the claim order it keeps with a real worker, and the
dead index entries it no longer reads while an old snapshot is held (EXPLAIN ANALYZE, BUFFERS)."""

from __future__ import annotations

import json

import psycopg

from dj import cursors, sql
from dj.cursors import HEAD, ClaimCursors, parse_wake
from tests.conftest import wait_for
from tests.support_jobs import record, record_slowly

US = cursors.SEPARATOR


def test_parse_wake_reads_a_position_or_the_queue_alone():
    assert parse_wake(f"mail{US}3{US}1700000000123456{US}42") == ("mail", (3, 1700000000123456, 42))
    assert parse_wake("mail") == ("mail", None)
    assert parse_wake(f"a{US}b{US}-1{US}5{US}6") == (f"a{US}b", (-1, 5, 6))  # the last three fields


def test_a_wake_before_the_position_moves_it_back_and_one_after_it_does_not():
    c = ClaimCursors(["q", "other"], min_priority=-5)
    params, head = c.params()
    assert head and params == {"after_priority": [-5, -5], "after_micros": [None, None], "after_id": [None, None]}
    c.claimed({"q": (5, 1000, 10)}, head=True, seconds=0.001)
    assert c.params() == ({"after_priority": [5, -5], "after_micros": [1000, None], "after_id": [10, None]}, True)
    c.claimed({"q": (5, 1000, 10), "other": (0, 1, 1)}, head=True, seconds=0.001)

    assert c.woken(f"q{US}5{US}2000{US}11")  # after the position: stays
    assert c.params()[0]["after_id"] == [10, 1]
    assert c.woken(f"q{US}0{US}500{US}12")  # a lower priority number: just before it
    assert c.params() == ({"after_priority": [0, 0], "after_micros": [500, 1], "after_id": [11, 1]}, False)
    assert not c.woken(f"elsewhere{US}0{US}1{US}1") and not c.woken("elsewhere")
    assert c.woken("other")  # the queue alone: back to the head
    assert c.params()[0]["after_id"] == [11, None]


def test_a_wake_during_a_claim_in_flight_is_not_overwritten_by_its_answer():
    c = ClaimCursors(["q"])
    c.claimed({"q": (0, 100, 1)}, head=True, seconds=0.001)
    c.params()  # the claim is sent
    c.woken(f"q{US}0{US}150{US}9")  # a job committed meanwhile; the claim may not have seen it
    c.claimed({"q": (0, 300, 20)}, head=False, seconds=0.001)  # its answer goes past it
    assert c.params()[0]["after_id"] == [8]


def test_a_recorded_failure_sends_it_to_the_head_only_for_a_lower_priority_number():
    c = ClaimCursors(["q"])
    c.claimed({"q": (5, 100, 1)}, head=True, seconds=0.001)
    c.failed("q", 5)  # its retry waits at least 5 s, so it lands after the position
    assert c.params()[0]["after_id"] == [1]
    c.failed("q", 4)
    assert c.params() == ({"after_priority": [-32768], "after_micros": [None], "after_id": [None]}, True)


def test_the_head_is_read_again_every_second_or_less_often_when_it_is_slow(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cursors.time, "monotonic", lambda: now[0])
    c = ClaimCursors(["q"])
    assert c.params()[1]
    c.claimed({"q": (0, 1, 1)}, head=True, seconds=0.01)
    now[0] += 0.5
    assert not c.params()[1]
    now[0] += 0.6
    assert c.params()[1]  # a second has passed
    c.claimed({"q": (0, 1, 1)}, head=True, seconds=0.4)  # a slow head read (an old snapshot)
    now[0] += 1.5
    assert not c.params()[1]
    now[0] += cursors.RESCAN_COST_FACTOR * 0.4
    assert c.params()[1]
    assert HEAD is None


def test_a_job_enqueued_before_the_workers_position_runs_next(conn, worker_process):
    # 150 jobs of priority 5 that take 20 ms each, on one thread: the worker claims a couple at a
    # time and reads on from its last one. A job of priority 0 enqueued meanwhile sits before that
    # position; its NOTIFY moves the worker back, so it runs within the next few jobs, not only at
    # the next read from the head.
    record_slowly.using(queue="pos", priority=5).enqueue_many([(f"slow-{i}", 0.02) for i in range(150)])
    w = worker_process("--queues", "pos", "--concurrency", "1")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs").fetchone()[0] >= 10, timeout=30)
    before = conn.execute("SELECT count(*) FROM test_runs").fetchone()[0]
    record.using(queue="pos", priority=0).enqueue("urgent")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs WHERE marker = 'urgent'").fetchone()[0] == 1,
             timeout=30)
    order = [m for (m,) in conn.execute("SELECT marker FROM test_runs ORDER BY at")]
    w.terminate()
    w.wait(30)
    # Ran in the first few after its enqueue (the one running, the one buffered, a little slack);
    # a worker that waited for its next read from the head (a second) would run ~50 others first.
    assert order.index("urgent") <= before + 6, order.index("urgent") - before


def _claim_plan(conn: psycopg.Connection, queue: str, after: dict) -> dict:
    params = {"queues": [queue], "min_priority": -32768, "max_priority": 32767, "limit": 100,
              "worker": "explain", **after}
    with conn.transaction(force_rollback=True):
        row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql.CLAIM, params).fetchone()[0]
    return row[0]["Plan"] if isinstance(row, list) else json.loads(row)[0]["Plan"]


def _index_buffers(plan: dict) -> int:
    """Shared buffers read by the claim index scan (the LATERAL's), hits and reads."""
    text = json.dumps(plan)
    total = 0
    def walk(node):
        nonlocal total
        if node.get("Index Name") == "jobs_claim_idx":
            total += node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0)
        for child in node.get("Plans", []):
            walk(child)
    walk(plan)
    assert total or "jobs_claim_idx" in text
    return total


def test_with_an_old_snapshot_a_claim_from_its_position_skips_the_dead_entries(conn, db_url):
    conn.execute("INSERT INTO jobs (queue, task) SELECT 'snap', 'test.record' FROM generate_series(1, 30000)")
    conn.execute("VACUUM ANALYZE jobs")
    with psycopg.connect(db_url) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM jobs").fetchone()  # the snapshot
        # Drain 20,000 of them the way workers do: claim (an update), then delete. Vacuum may remove
        # none of those row versions, and no index scan may mark their entries dead.
        conn.execute("UPDATE jobs SET locked_by = 'w', attempts = 1 WHERE id <= 20000")
        conn.execute("DELETE FROM jobs WHERE id <= 20000")
        conn.execute("VACUUM jobs")
        first_live = conn.execute("SELECT priority, (extract(epoch FROM run_at) * 1000000)::int8, id FROM jobs"
                                  " ORDER BY priority, run_at, id LIMIT 1").fetchone()
        at = {"after_priority": [first_live[0]], "after_micros": [first_live[1]], "after_id": [first_live[2] - 1]}
        head = {"after_priority": [-32768], "after_micros": [None], "after_id": [None]}
        from_position, from_head = _claim_plan(conn, "snap", at), _claim_plan(conn, "snap", head)
    # Both claim the same 100 jobs, in order; from the head the index scan also reads the 20,000
    # dead entries (and their heap pages), from the position it starts at the first live one.
    assert from_position["Actual Rows"] == from_head["Actual Rows"] == 100
    assert _index_buffers(from_position) < 50
    assert _index_buffers(from_head) > 200
