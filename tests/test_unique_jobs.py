"""Unique jobs: a held key returns the holder's id and inserts nothing, even under concurrency."""

import subprocess
import sys

import psycopg

from dj.cursors import parse_wake

from tests.conftest import ROOT
from tests.support_jobs import record, unique_record


def test_a_held_key_returns_the_existing_job(conn):
    first = unique_record.enqueue("a")
    assert unique_record.enqueue("a") == first
    other = unique_record.enqueue("b")
    assert other != first
    assert record.using(unique_key="k1").enqueue("x") == record.using(unique_key="k1").enqueue("y")
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3


def test_an_enqueue_that_finds_its_key_held_wakes_no_worker(db_url, conn):
    first = unique_record.using(queue="u").enqueue("a")
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN dj_jobs")
        assert unique_record.using(queue="u").enqueue("a") == first
        unique_record.using(queue="v").enqueue("b")
        assert [parse_wake(n.payload)[0] for n in listener.notifies(timeout=1.0, stop_after=1)] == ["v"]


def test_enqueue_many_skips_held_keys_and_returns_every_id(conn):
    held = unique_record.enqueue("2")
    ids = unique_record.enqueue_many([("1",), ("2",), ("3",), ("1",)])
    assert ids[1] == held
    assert ids[0] == ids[3]
    assert len(set(ids)) == 3
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3


def test_the_key_is_free_again_once_the_job_succeeds_or_dies(conn, run_burst):
    first = unique_record.enqueue("z")
    run_burst()
    second = unique_record.enqueue("z")
    assert second != first
    conn.execute("UPDATE jobs SET failed_at = now() WHERE id = %s", (second,))  # dead
    third = unique_record.enqueue("z")
    assert third not in (first, second)


ENQUEUER = """
import sys
from tests.support_jobs import unique_record
ids = {unique_record.enqueue(f"k{i % 50}") for i in range(400)}
print(len(ids))
"""


def test_eight_concurrent_enqueuers_insert_each_key_once(conn):
    procs = [subprocess.Popen([sys.executable, "-c", ENQUEUER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(out.strip() == "50" for out in outputs), outputs
    keys, rows = conn.execute("SELECT count(DISTINCT unique_key), count(*) FROM jobs").fetchone()
    assert (keys, rows) == (50, 50)
