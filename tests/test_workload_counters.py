"""Counter-cache rebuilds: exact values, id ranges, concurrency, bad input."""

import random
import threading

import psycopg
import pytest

import dj
from tasks import counters, seed
from tests.conftest import wait_for

ALL_COUNTERS = """
SELECT 'users' AS t, id, orders_count, NULL::int FROM users
UNION ALL SELECT 'items', id, orders_count, NULL FROM items
UNION ALL SELECT 'orders', id, items_count, NULL FROM orders
UNION ALL SELECT 'questions', id, answers_count, approved_answers_count FROM questions
ORDER BY 1, 2
"""


def storefront_and_board(conn):
    """3 users, 3 items, 3 orders, 3 questions with known counts, and every counter wrong."""
    conn.execute("INSERT INTO users (name, email) SELECT 'u' || i, 'u' || i || '@x' FROM generate_series(1, 3) i")
    conn.execute("INSERT INTO items (name, description, image_url) SELECT 'i' || i, '', '' FROM generate_series(1, 3) i")
    conn.execute("INSERT INTO orders (user_id, amount) VALUES (1, 1), (1, 2), (2, 3)")
    # Order 1 holds item 1 twice: duplicates count, for the item and for the order.
    conn.execute("INSERT INTO order_items (order_id, item_id) VALUES (1, 1), (1, 1), (1, 2), (2, 2)")
    conn.execute("INSERT INTO questions (title, body) SELECT 'q' || i, '' FROM generate_series(1, 3) i")
    conn.execute(
        "INSERT INTO answers (question_id, body, approved) VALUES"
        " (1, '', true), (1, '', true), (1, '', false), (2, '', false)"
    )
    for table, column in [("users", "orders_count"), ("items", "orders_count"), ("orders", "items_count"),
                          ("questions", "answers_count"), ("questions", "approved_answers_count")]:
        conn.execute(f"UPDATE {table} SET {column} = 7")


EXPECTED = [
    ("items", 1, 2, None), ("items", 2, 2, None), ("items", 3, 0, None),
    ("orders", 1, 3, None), ("orders", 2, 1, None), ("orders", 3, 0, None),
    ("questions", 1, 3, 2), ("questions", 2, 1, 0), ("questions", 3, 0, 0),
    ("users", 1, 2, None), ("users", 2, 1, None), ("users", 3, 0, None),
]


def test_rebuild_jobs_set_every_counter_exactly(conn, run_burst):
    storefront_and_board(conn)
    assert len(counters.check(conn)) == 15

    ranges = counters.enqueue_rebuild(2)

    assert ranges == [
        ("users", 1, 2), ("users", 3, 3), ("items", 1, 2), ("items", 3, 3),
        ("orders", 1, 2), ("orders", 3, 3), ("questions", 1, 2), ("questions", 3, 3),
    ]
    run_burst(processes=2, concurrency=4)
    assert conn.execute(ALL_COUNTERS).fetchall() == EXPECTED
    assert counters.check(conn) == []
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_check_reports_each_wrong_counter(conn):
    storefront_and_board(conn)
    conn.execute("UPDATE users SET orders_count = 2 WHERE id = 1")

    wrong = counters.check(conn)

    assert {"table": "users", "column": "orders_count", "id": 2, "cached": 7, "actual": 1} in wrong
    assert not any(m["table"] == "users" and m["id"] == 1 for m in wrong)
    assert {(m["table"], m["column"]) for m in wrong} == {
        ("users", "orders_count"), ("items", "orders_count"), ("orders", "items_count"),
        ("questions", "answers_count"), ("questions", "approved_answers_count"),
    }
    assert len(counters.check(conn, limit=3)) == 3


def test_a_rebuild_touches_only_its_range_and_only_changed_rows(conn):
    storefront_and_board(conn)

    assert counters.rebuild_range(conn, "users", 2, 3) == 2
    assert conn.execute("SELECT id, orders_count FROM users ORDER BY id").fetchall() == [(1, 7), (2, 1), (3, 0)]
    # Idempotent: a second run finds nothing to change.
    assert counters.rebuild_range(conn, "users", 2, 3) == 0
    assert counters.rebuild_range(conn, "users", 1, 3) == 1


def test_a_rebuild_on_its_own_writes_only_wrong_rows_and_locks_no_others(db_url, conn):
    seed.insert_questions(conn, 4)
    seed.insert_answers(conn, 20)
    counters.rebuild_range(conn, "questions", 1, 4)
    conn.execute("UPDATE questions SET answers_count = answers_count + 5 WHERE id = 3")
    counters.rebuild_range(conn, "questions", 1, 4)
    # The optimistic path wrote row 3 alone; the locking path would have stamped every row's xmax.
    stamped = conn.execute("SELECT id FROM questions WHERE xmax <> 0 ORDER BY id").fetchall()
    assert stamped == []
    assert counters.check(conn) == []
    with psycopg.connect(db_url) as inside:
        inside.execute("SELECT 1")  # the caller's transaction is open: rebuild_range locks
        counters.rebuild_range(inside, "questions", 1, 4)
        assert inside.execute("SELECT count(*) FROM questions WHERE xmax <> 0").fetchone()[0] == 4


def test_the_serial_job_rebuilds_whole_tables(conn, run_burst):
    storefront_and_board(conn)
    counters.rebuild_all_serial.enqueue("all")
    run_burst()
    assert conn.execute(ALL_COUNTERS).fetchall() == EXPECTED


def test_corrupt_damages_about_the_requested_share(conn):
    seed.insert_questions(conn, 2000)
    hit = counters.corrupt(conn, 0.25)
    wrong = {m["id"] for m in counters.check(conn)}
    assert len(wrong) == hit
    assert 350 < hit < 650


def ids_of(conn, table):
    return [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_ranges_cover_every_id_exactly_once(conn, batch):
    seed.insert_users(conn, 2500)
    # Gaps: a deleted block, every fifth id, and the first id.
    conn.execute("DELETE FROM users WHERE id BETWEEN 100 AND 350 OR id % 5 = 0 OR id = 1")
    ids = ids_of(conn, "users")

    ranges = counters.plan_ranges(conn, "users", batch)

    covered = [[i for i in ids if first <= i <= last] for first, last in ranges]
    assert [i for chunk in covered for i in chunk] == ids
    assert all(len(chunk) == batch for chunk in covered[:-1])
    assert 1 <= len(covered[-1]) <= batch
    assert all(chunk[0] == first and chunk[-1] == last for chunk, (first, last) in zip(covered, ranges))
    assert all(a_last < b_first for (_, a_last), (b_first, _) in zip(ranges, ranges[1:]))


def test_enqueue_rebuild_enqueues_one_job_per_range(conn):
    seed.insert_questions(conn, 25)
    seed.insert_users(conn, 3)

    ranges = counters.enqueue_rebuild(10, table="questions", queue="counters", priority=3)

    assert ranges == [("questions", 1, 10), ("questions", 11, 20), ("questions", 21, 25)]
    jobs = conn.execute("SELECT task, queue, priority, args FROM jobs ORDER BY id").fetchall()
    assert jobs == [("counters.rebuild", "counters", 3, list(r)) for r in ranges]


@pytest.mark.parametrize("batch", [0, -1, -1000, True, 1.5, "10"])
def test_a_batch_that_is_not_a_positive_integer_is_refused(unreachable_database, batch):
    """Refused before any round trip (with no database to reach): nothing can have been enqueued."""
    with pytest.raises(dj.DJError, match="--batch must be a positive integer"):
        counters.enqueue_rebuild(batch)


def test_an_unknown_table_is_refused_naming_the_valid_ones(conn):
    with pytest.raises(dj.DJError, match="unknown table 'answers'.*all, users, items, orders, questions"):
        counters.enqueue_rebuild(10, table="answers")
    with pytest.raises(dj.DJError, match="unknown table"):
        counters.rebuild_range(conn, "users; DROP TABLE users", 1, 2)


def test_an_empty_database_has_nothing_to_rebuild(conn):
    assert counters.enqueue_rebuild(1000) == []
    assert counters.enqueue_rebuild(1, table="orders") == []
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert counters.check(conn) == []


def answer_continuously(db_url, stop: threading.Event) -> int:
    """Insert answers, one transaction each, until stopped; returns how many."""
    inserted = 0
    with psycopg.connect(db_url) as writer:
        while not stop.is_set() or inserted < 50:
            question, approved = random.randint(1, 200), random.random() < 0.3
            with writer.transaction():
                writer.execute(
                    "INSERT INTO answers (question_id, body, approved) VALUES (%s, 'a', %s)", (question, approved)
                )
            inserted += 1
    return inserted


def test_rebuilds_alongside_inserts_end_correct_after_one_final_rebuild(db_url, conn, run_burst):
    seed.insert_questions(conn, 200)
    seed.insert_answers(conn, 2000)
    stop = threading.Event()
    inserted = []
    writers = [threading.Thread(target=lambda: inserted.append(answer_continuously(db_url, stop)))
               for _ in range(2)]
    for w in writers:
        w.start()
    try:
        for _ in range(3):
            counters.enqueue_rebuild(7, table="questions")
            run_burst(processes=2, concurrency=4)
    finally:
        stop.set()
        for w in writers:
            w.join()

    assert sum(inserted) >= 100
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    counters.enqueue_rebuild(7, table="questions")
    run_burst()
    assert counters.check(conn) == []
    assert conn.execute("SELECT sum(answers_count) FROM questions").fetchone()[0] == 2000 + sum(inserted)


def blocked_on_a_lock(conn, pid) -> bool:
    return conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()[0]


def test_a_rebuild_waits_for_a_writer_that_maintains_the_counter_and_counts_its_answer(db_url, conn):
    seed.insert_questions(conn, 3)
    seed.insert_answers(conn, 10)
    conn.execute("UPDATE questions SET answers_count = 99 WHERE id = 2")
    with psycopg.connect(db_url) as writer, psycopg.connect(db_url, autocommit=True) as rebuilder:
        writer.execute("INSERT INTO answers (question_id, body, approved) VALUES (2, 'a', true)")
        writer.execute(
            "UPDATE questions SET answers_count = answers_count + 1,"
            " approved_answers_count = approved_answers_count + 1 WHERE id = 2"
        )
        rebuild = threading.Thread(target=counters.rebuild_range, args=(rebuilder, "questions", 1, 3))
        rebuild.start()
        wait_for(lambda: blocked_on_a_lock(conn, rebuilder.info.backend_pid), message="the rebuild to wait")
        # Had the rebuild counted before taking its locks, it would now overwrite the
        # writer's increment with a count that misses the writer's answer.
        writer.commit()
        rebuild.join(30)
    assert not rebuild.is_alive()
    assert counters.check(conn) == []


def test_a_rebuild_does_not_wait_for_plain_answer_inserts(db_url, conn):
    seed.insert_questions(conn, 3)
    with psycopg.connect(db_url) as writer:
        # The insert's foreign-key check holds FOR KEY SHARE on question 2 until commit.
        writer.execute("INSERT INTO answers (question_id, body, approved) VALUES (2, 'a', true)")
        counters.rebuild_range(conn, "questions", 1, 3)
        assert counters.check(conn) == []
        writer.execute("UPDATE questions SET answers_count = answers_count + 1,"
                       " approved_answers_count = approved_answers_count + 1 WHERE id = 2")
        writer.commit()
    assert counters.check(conn) == []


def test_enqueueing_the_same_rebuild_twice_while_pending_does_not_double_the_work(conn, run_burst):
    conn.execute("INSERT INTO questions (title, body) SELECT 'q', 'b' FROM generate_series(1, 25)")
    first = counters.enqueue_rebuild(10, table="questions")
    second = counters.enqueue_rebuild(10, table="questions")
    assert list(first) == list(second) and len(first) == 3
    assert conn.execute("SELECT count(*) FROM jobs WHERE task = 'counters.rebuild'").fetchone()[0] == 3


def test_a_rebuild_batch_ends_with_a_recorded_counters_check(conn, run_burst):
    conn.execute("INSERT INTO questions (title, body, answers_count) SELECT 'q', 'b', 7 FROM generate_series(1, 25)")
    plan = counters.enqueue_rebuild(10, table="questions")
    run_burst()
    run_burst()  # the callback, enqueued by the last rebuild job
    total, succeeded, result = conn.execute("SELECT total, succeeded, result FROM batches WHERE id = %s",
                                            (plan.batch_id,)).fetchone()
    assert (total, succeeded) == (3, 3)
    assert result["correct"] is True and result["jobs_succeeded"] == 3
