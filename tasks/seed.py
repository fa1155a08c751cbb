"""Seeding generators for the workload, after storedom's small background jobs.

Each generator is a job taking `(count, slow=False)`:
- fast mode writes its `count` rows in one transaction with COPY, from text pools
  that Faker fills once per process (Faker is far slower than COPY);
- slow mode waits `0.5 / randint(1, 25)` seconds before each record, like the
  tutorial's `Delay.wait`, and commits record by record.

Orders and answers go to random existing parents, picked from the parents
committed when the job starts; with no parent yet the job raises and is retried.
The counter caches (orders_count, items_count, answers_count, ...) are not
maintained here: they stay 0 until `tasks.counters` rebuilds them, which is the
workload the rebuild jobs exist for.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING

import psycopg

import dj

if TYPE_CHECKING:
    from faker import Faker
from dj import job

POOL_SIZE = 2000
APPROVED_SHARE = 0.3
ITEMS_PER_ORDER = (1, 6)
CHILD_PRIORITY = 10
ENQUEUE_CHUNK = 10_000

CHILDREN = ("orders", "answers")

_ADJECTIVES = (
    "Small", "Ergonomic", "Rustic", "Intelligent", "Gorgeous", "Incredible", "Fantastic",
    "Practical", "Sleek", "Awesome", "Enormous", "Mediocre", "Synergistic", "Heavy Duty",
    "Lightweight", "Aerodynamic", "Durable",
)
_MATERIALS = (
    "Steel", "Wooden", "Concrete", "Plastic", "Cotton", "Granite", "Rubber", "Leather",
    "Silk", "Wool", "Linen", "Marble", "Iron", "Bronze", "Copper", "Aluminum", "Paper",
)
_PRODUCTS = (
    "Chair", "Car", "Computer", "Gloves", "Pants", "Shirt", "Table", "Shoes", "Hat",
    "Plate", "Knife", "Bottle", "Coat", "Lamp", "Keyboard", "Bag", "Bench", "Clock",
    "Watch", "Wallet",
)


class MissingParents(Exception):
    """The parent table is still empty; the job fails so that it is retried later."""


def _product_name(fake: "Faker") -> str:
    return " ".join(fake.random_element(words) for words in (_ADJECTIVES, _MATERIALS, _PRODUCTS))


_MAKERS = {
    "name": lambda fake: fake.name(),
    "email": lambda fake: fake.email(),
    "product": _product_name,
    "paragraph": lambda fake: fake.paragraph(nb_sentences=3),
    "image_url": lambda fake: fake.image_url(),
    "title": lambda fake: fake.sentence(nb_words=8).rstrip(".") + "?",
    "sentence": lambda fake: fake.sentence(nb_words=12),
}
_pools: dict[str, tuple[str, ...]] = {}
# A worker runs many seeding jobs at once on its threads; without the lock each of them
# would build the same pool on its first record.
_pools_lock = threading.Lock()


@functools.cache
def _faker() -> "Faker":
    from faker import Faker  # slow to import; only the seeding jobs need it

    return Faker()


def pool(kind: str) -> tuple[str, ...]:
    """POOL_SIZE fake texts of one kind, made once per process and sampled for every row."""
    with _pools_lock:
        if kind not in _pools:
            fake = _faker()
            _pools[kind] = tuple(_MAKERS[kind](fake) for _ in range(POOL_SIZE))
        return _pools[kind]


def delay_wait() -> float:
    """The tutorial's Delay.wait: sleep 0.5 / randint(1, 25) seconds; returns the delay."""
    seconds = 0.5 / random.randint(1, 25)
    time.sleep(seconds)
    return seconds


def item_price(item_id: int) -> Decimal:
    """Items have no price column; a stable pseudo price between 1.00 and 99.99 stands in."""
    return Decimal((item_id * 7919) % 9900 + 100) / 100


class ParentIds:
    """Random picks among the ids of a parent table's committed rows."""

    def __init__(self, conn: psycopg.Connection, table: str):
        if table not in ("users", "items", "questions"):
            raise ValueError(f"not a parent table: {table}")
        with conn.transaction():
            low, high, count = conn.execute(
                f"SELECT min(id), max(id), count(*) FROM {table}"
            ).fetchone()
            if not count:
                raise MissingParents(f"no {table} yet; retry once some exist")
            if count == high - low + 1:
                # Every id in [low, high] is a committed row: no need to fetch them.
                self.ids: range | list[int] = range(low, high + 1)
            else:
                self.ids = [row[0] for row in conn.execute(f"SELECT id FROM {table}")]

    def pick(self, k: int) -> list[int]:
        return random.choices(self.ids, k=k)


def _copy(conn: psycopg.Connection, statement: str, rows: Iterable[tuple]) -> None:
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def insert_users(conn: psycopg.Connection, count: int, slow: bool = False) -> int:
    names, emails = pool("name"), pool("email")
    if slow:
        for _ in range(count):
            delay_wait()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO users (name, email) VALUES (%s, %s)",
                    (random.choice(names), random.choice(emails)),
                )
        return count
    with conn.transaction():
        _copy(
            conn,
            "COPY users (name, email) FROM STDIN",
            zip(random.choices(names, k=count), random.choices(emails, k=count)),
        )
    return count


def insert_items(conn: psycopg.Connection, count: int, slow: bool = False) -> int:
    names, descriptions, images = pool("product"), pool("paragraph"), pool("image_url")
    if slow:
        for _ in range(count):
            delay_wait()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO items (name, description, image_url) VALUES (%s, %s, %s)",
                    (random.choice(names), random.choice(descriptions), random.choice(images)),
                )
        return count
    with conn.transaction():
        _copy(
            conn,
            "COPY items (name, description, image_url) FROM STDIN",
            zip(
                random.choices(names, k=count),
                random.choices(descriptions, k=count),
                random.choices(images, k=count),
            ),
        )
    return count


def insert_orders(conn: psycopg.Connection, count: int, slow: bool = False) -> int:
    if count == 0:
        return 0
    users, items = ParentIds(conn, "users"), ParentIds(conn, "items")

    def basket() -> list[int]:
        return items.pick(random.randint(*ITEMS_PER_ORDER))

    if slow:
        for _ in range(count):
            delay_wait()
            chosen = basket()
            with conn.transaction():
                (order_id,) = conn.execute(
                    "INSERT INTO orders (user_id, amount) VALUES (%s, %s) RETURNING id",
                    (users.pick(1)[0], sum(map(item_price, chosen))),
                ).fetchone()
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO order_items (order_id, item_id) VALUES (%s, %s)",
                        [(order_id, item_id) for item_id in chosen],
                    )
        return count

    with conn.transaction():
        # Ids are taken from the identity's sequence up front so that the order_items
        # rows can reference their orders within the same COPY-only transaction. The sequence
        # is named: pg_get_serial_sequence() inside nextval() would run once per row.
        order_ids = [
            row[0]
            for row in conn.execute("SELECT nextval('orders_id_seq') FROM generate_series(1, %s)", (count,))
        ]
        baskets = [basket() for _ in order_ids]
        _copy(
            conn,
            "COPY orders (id, user_id, amount) FROM STDIN",
            (
                (order_id, user_id, sum(map(item_price, chosen)))
                for order_id, user_id, chosen in zip(order_ids, users.pick(count), baskets)
            ),
        )
        _copy(
            conn,
            "COPY order_items (order_id, item_id) FROM STDIN",
            (
                (order_id, item_id)
                for order_id, chosen in zip(order_ids, baskets)
                for item_id in chosen
            ),
        )
    return count


def insert_questions(conn: psycopg.Connection, count: int, slow: bool = False) -> int:
    titles, bodies = pool("title"), pool("paragraph")
    if slow:
        for _ in range(count):
            delay_wait()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO questions (title, body) VALUES (%s, %s)",
                    (random.choice(titles), random.choice(bodies)),
                )
        return count
    with conn.transaction():
        _copy(
            conn,
            "COPY questions (title, body) FROM STDIN",
            zip(random.choices(titles, k=count), random.choices(bodies, k=count)),
        )
    return count


def insert_answers(conn: psycopg.Connection, count: int, slow: bool = False) -> int:
    if count == 0:
        return 0
    questions = ParentIds(conn, "questions")
    bodies = pool("sentence")
    if slow:
        for _ in range(count):
            delay_wait()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO answers (question_id, body, approved) VALUES (%s, %s, %s)",
                    (questions.pick(1)[0], random.choice(bodies), random.random() < APPROVED_SHARE),
                )
        return count
    with conn.transaction():
        _copy(
            conn,
            "COPY answers (question_id, body, approved) FROM STDIN",
            (
                (question_id, body, random.random() < APPROVED_SHARE)
                for question_id, body in zip(
                    questions.pick(count), random.choices(bodies, k=count)
                )
            ),
        )
    return count


INSERTERS = {
    "users": insert_users,
    "items": insert_items,
    "orders": insert_orders,
    "questions": insert_questions,
    "answers": insert_answers,
}


@job(name="seed.users")
def seed_users(count: int, slow: bool = False) -> None:
    with dj.connect() as conn:
        insert_users(conn, count, slow)


@job(name="seed.items")
def seed_items(count: int, slow: bool = False) -> None:
    with dj.connect() as conn:
        insert_items(conn, count, slow)


@job(name="seed.orders")
def seed_orders(count: int, slow: bool = False) -> None:
    with dj.connect() as conn:
        insert_orders(conn, count, slow)


@job(name="seed.questions")
def seed_questions(count: int, slow: bool = False) -> None:
    with dj.connect() as conn:
        insert_questions(conn, count, slow)


@job(name="seed.answers")
def seed_answers(count: int, slow: bool = False) -> None:
    with dj.connect() as conn:
        insert_answers(conn, count, slow)


JOBS = {
    "users": seed_users,
    "items": seed_items,
    "orders": seed_orders,
    "questions": seed_questions,
    "answers": seed_answers,
}


def split(count: int, per_job: int | None) -> list[int]:
    """Sizes of the jobs that seed `count` records, `per_job` at most in each."""
    if count == 0:
        return []
    if per_job is None or per_job >= count:
        return [count]
    full, rest = divmod(count, per_job)
    return [per_job] * full + ([rest] if rest else [])


def _check_count(option: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum else "a non-negative"
        raise dj.DJError(f"--{option} must be {kind} integer, got {value!r}")


def enqueue_seed(
    users: int = 100,
    items: int = 500,
    orders: int = 100,
    questions: int = 0,
    answers: int = 0,
    per_job: int | None = None,
    slow: bool = False,
    queue: str = "default",
) -> dict[str, dict[str, int]]:
    """Enqueue seeding jobs of `per_job` records (None: one job per generator).

    Orders and answers get priority 10 and their parents 0, so that workers tend
    to create parents first; a child job that still finds no parent is retried.
    Returns {generator: {"records": n, "jobs": k}} for every generator.
    """
    counts = {
        "users": users,
        "items": items,
        "orders": orders,
        "questions": questions,
        "answers": answers,
    }
    for name, value in counts.items():
        _check_count(name, value, 0)
    if per_job is not None:
        _check_count("per-job", per_job, 1)

    summary = {}
    for name, value in counts.items():
        sizes = split(value, per_job)
        priority = CHILD_PRIORITY if name in CHILDREN else 0
        target = JOBS[name].using(queue=queue, priority=priority)
        for start in range(0, len(sizes), ENQUEUE_CHUNK):
            chunk = sizes[start : start + ENQUEUE_CHUNK]
            target.enqueue_many([(size, True) if slow else (size,) for size in chunk])
        summary[name] = {"records": value, "jobs": len(sizes)}
    return summary
