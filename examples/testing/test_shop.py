from datetime import timedelta

import psycopg

import dj
from shop import SENT, ask_for_review, checkout, place_order, send_receipt


def test_checkout_enqueues_the_order(dj_jobs):       # capture: nothing is written anywhere
    checkout(7, "a@b.c")
    dj_jobs.assert_enqueued(place_order, args=[7, "a@b.c"])
    assert dj_jobs.drain() == 3                      # the order, then the two jobs it enqueued
    assert (7, "a@b.c") in SENT
    dj_jobs.assert_performed(ask_for_review, args=[7], run_at=timedelta(days=3))


def test_checkout_sends_the_receipt_at_once(dj_inline):  # inline: each job runs in the enqueue
    checkout(8, "d@e.f")
    assert (8, "d@e.f") in SENT


def test_the_receipt_is_a_row_a_worker_runs(dj_database):  # a migrated, empty database
    send_receipt.enqueue(9, "g@h.i")
    with psycopg.connect(dj_database) as conn:
        assert conn.execute("SELECT task, args FROM jobs").fetchall() == [("shop.send_receipt", [9, "g@h.i"])]
    dj.Worker(queues=["mail"]).run(burst=True)
    assert (9, "g@h.i") in SENT


def test_without_pytest_fixtures():
    with dj.testing.capture() as jobs:
        send_receipt.using(priority=5).enqueue(10, "j@k.l")
        assert [(j.task, j.args, j.priority) for j in jobs.jobs] == [("shop.send_receipt", [10, "j@k.l"], 5)]
        jobs.drain()
    with dj.testing.inline():
        send_receipt.enqueue(11, "m@n.o")
    assert (10, "j@k.l") in SENT and (11, "m@n.o") in SENT
