"""Seeding the workload: every mode creates the requested records, slow mode waits."""

import time
from decimal import Decimal

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

import dj
from tasks import schema, seed

WORKLOAD = ("users", "items", "orders", "order_items", "questions", "answers")


def counts(conn) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in WORKLOAD}


def jobs(conn) -> list[tuple]:
    return conn.execute("SELECT task, priority, args FROM jobs ORDER BY id").fetchall()


def assert_orders_are_well_formed(conn) -> None:
    sizes = [r[0] for r in conn.execute(
        "SELECT count(oi.id) FROM orders o LEFT JOIN order_items oi ON oi.order_id = o.id GROUP BY o.id")]
    assert sizes and all(1 <= n <= 6 for n in sizes)
    for order_id, amount in conn.execute("SELECT id, amount FROM orders"):
        items = [r[0] for r in conn.execute("SELECT item_id FROM order_items WHERE order_id = %s", (order_id,))]
        assert amount == sum(map(seed.item_price, items))


def test_the_migration_creates_what_the_models_describe(db_url):
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    # The core's tables are not in this metadata: leave them out of the comparison.
    only_workload = {"include_name": lambda name, kind, parent: kind != "table" or name in WORKLOAD}
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts=only_workload), schema.metadata)
    engine.dispose()
    assert diff == []


def test_one_big_job_per_generator(conn, run_burst):
    summary = seed.enqueue_seed(users=5, items=7, orders=4, questions=3, answers=11)

    assert summary == {
        "users": {"records": 5, "jobs": 1}, "items": {"records": 7, "jobs": 1},
        "orders": {"records": 4, "jobs": 1}, "questions": {"records": 3, "jobs": 1},
        "answers": {"records": 11, "jobs": 1},
    }
    # Children after parents: priority 10 against 0.
    assert sorted(jobs(conn), key=lambda j: j[1]) == [
        ("seed.users", 0, [5]), ("seed.items", 0, [7]), ("seed.questions", 0, [3]),
        ("seed.orders", 10, [4]), ("seed.answers", 10, [11]),
    ]
    run_burst(concurrency=1)
    assert {k: v for k, v in counts(conn).items() if k != "order_items"} == {
        "users": 5, "items": 7, "orders": 4, "questions": 3, "answers": 11}
    assert_orders_are_well_formed(conn)
    assert jobs(conn) == []


def test_one_job_per_record(conn, run_burst):
    summary = seed.enqueue_seed(users=4, items=3, orders=5, questions=2, answers=6, per_job=1)

    assert {k: v["jobs"] for k, v in summary.items()} == {
        "users": 4, "items": 3, "orders": 5, "questions": 2, "answers": 6}
    assert all(args == [1] for _, _, args in jobs(conn))
    run_burst(concurrency=1)
    assert {k: v for k, v in counts(conn).items() if k != "order_items"} == {
        "users": 4, "items": 3, "orders": 5, "questions": 2, "answers": 6}
    assert_orders_are_well_formed(conn)


def test_jobs_of_k_records(conn, run_burst):
    summary = seed.enqueue_seed(users=10, items=6, orders=7, questions=0, answers=0, per_job=3)

    assert {k: v["jobs"] for k, v in summary.items()} == {
        "users": 4, "items": 2, "orders": 3, "questions": 0, "answers": 0}
    sizes = {}
    for task, _, args in jobs(conn):
        sizes.setdefault(task, []).append(args[0])
    assert sizes == {"seed.users": [3, 3, 3, 1], "seed.items": [3, 3], "seed.orders": [3, 3, 1]}
    run_burst(concurrency=1)
    assert {k: v for k, v in counts(conn).items() if k != "order_items"} == {
        "users": 10, "items": 6, "orders": 7, "questions": 0, "answers": 0}


def test_many_small_jobs_on_several_processes(conn, run_burst):
    seed.enqueue_seed(users=30, items=20, orders=0, questions=20, answers=0, per_job=2)
    run_burst(processes=2, concurrency=4)
    seed.enqueue_seed(users=0, items=0, orders=25, questions=0, answers=300, per_job=7)
    run_burst(processes=2, concurrency=4)
    assert {k: v for k, v in counts(conn).items() if k != "order_items"} == {
        "users": 30, "items": 20, "orders": 25, "questions": 20, "answers": 300}
    assert_orders_are_well_formed(conn)


def test_records_look_like_the_storefront_and_the_board(conn):
    seed.insert_users(conn, 50)
    seed.insert_items(conn, 50)
    seed.insert_questions(conn, 100)
    seed.insert_answers(conn, 3000)
    for name, email in conn.execute("SELECT name, email FROM users"):
        assert " " in name and "@" in email
    for name, description, url in conn.execute("SELECT name, description, image_url FROM items"):
        assert len(name.split()) >= 3 and description and url.startswith("http")
    for (title,) in conn.execute("SELECT title FROM questions"):
        assert title.endswith("?")
    approved = conn.execute("SELECT avg(approved::int) FROM answers").fetchone()[0]
    assert Decimal("0.25") < approved < Decimal("0.35")
    # The seeders leave the counter caches to the rebuild.
    assert conn.execute("SELECT max(answers_count) FROM questions").fetchone()[0] == 0


def test_children_go_to_existing_parents_despite_gaps_in_ids(conn):
    seed.insert_users(conn, 40)
    seed.insert_items(conn, 40)
    conn.execute("DELETE FROM users WHERE id % 3 = 0")
    conn.execute("DELETE FROM items WHERE id BETWEEN 5 AND 30")

    seed.insert_orders(conn, 200)

    assert conn.execute("SELECT count(*) FROM orders WHERE user_id % 3 = 0").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM order_items WHERE item_id BETWEEN 5 AND 30").fetchone()[0] == 0
    assert len({r[0] for r in conn.execute("SELECT DISTINCT user_id FROM orders")}) > 10


def test_children_without_parents_fail_and_are_retried_later(conn, run_burst):
    with pytest.raises(seed.MissingParents, match="no questions yet"):
        seed.insert_answers(conn, 5)
    seed.insert_users(conn, 2)
    with pytest.raises(seed.MissingParents, match="no items yet"):
        seed.insert_orders(conn, 5)
    assert counts(conn)["orders"] == 0

    seed.seed_answers.enqueue(3)
    run_burst()
    attempts, failed_at, error = conn.execute("SELECT attempts, failed_at, last_error FROM jobs").fetchone()
    assert attempts == 1 and failed_at is None and "no questions yet" in error


def test_slow_mode_waits_before_each_record_and_commits_it(conn):
    started = time.monotonic()
    seed.insert_users(conn, 4, slow=True)
    elapsed = time.monotonic() - started

    assert elapsed >= 4 * 0.5 / 25
    # now() is the transaction's start: one transaction per record, at least a wait apart.
    stamps = [r[0] for r in conn.execute("SELECT created_at FROM users ORDER BY id")]
    assert len(stamps) == 4
    assert all((b - a).total_seconds() >= 0.5 / 25 for a, b in zip(stamps, stamps[1:]))


def test_slow_jobs_wait_too(conn, run_burst):
    seed.enqueue_seed(users=3, items=2, orders=0, slow=True)
    assert {tuple(args) for _, _, args in jobs(conn)} == {(3, True), (2, True)}
    seed.enqueue_seed(users=0, items=0, orders=2, slow=True, per_job=1)

    started = time.monotonic()
    run_burst(concurrency=1)
    assert time.monotonic() - started >= 7 * 0.5 / 25
    stamps = [r[0] for r in conn.execute("SELECT created_at FROM users ORDER BY id")]
    assert all((b - a).total_seconds() >= 0.5 / 25 for a, b in zip(stamps, stamps[1:]))
    assert {k: v for k, v in counts(conn).items() if k != "order_items"} == {
        "users": 3, "items": 2, "orders": 2, "questions": 0, "answers": 0}


@pytest.mark.no_database
def test_the_delay_is_the_tutorials():
    delays = {seed.delay_wait() for _ in range(20)}
    assert all(0.5 / 25 - 1e-9 <= d <= 0.5 for d in delays)
    assert delays <= {0.5 / n for n in range(1, 26)}


@pytest.mark.parametrize("options, message", [
    ({"users": -1}, "--users must be a non-negative integer"),
    ({"answers": -5}, "--answers must be a non-negative integer"),
    ({"per_job": 0}, "--per-job must be a positive integer"),
    ({"per_job": -3}, "--per-job must be a positive integer"),
    ({"orders": 2.5}, "--orders must be a non-negative integer"),
])
def test_bad_counts_are_refused_and_nothing_is_enqueued(dj_jobs, options, message):
    with pytest.raises(dj.DJError, match=message):
        seed.enqueue_seed(**options)
    assert dj_jobs.jobs == []


def test_nothing_to_seed_enqueues_nothing(dj_jobs):
    summary = seed.enqueue_seed(users=0, items=0, orders=0)
    assert all(v == {"records": 0, "jobs": 0} for v in summary.values())
    assert dj_jobs.jobs == []


@pytest.mark.no_database
def test_split():
    assert seed.split(0, None) == []
    assert seed.split(10, None) == [10]
    assert seed.split(10, 1) == [1] * 10
    assert seed.split(10, 4) == [4, 4, 2]
    assert seed.split(3, 100) == [3]
