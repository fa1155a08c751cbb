"""Counter caches rebuilt while the app takes writes: what the DelayedJob post's batches are for.

A `Writer` plays the live application: at a fixed rate it inserts answers (and orders with their
items), each bumping its parents' counters in the same transaction, as a Rails counter cache
does. While it writes, the counters are damaged and rebuilt in one of several ways (`MODES`),
and the run reports how long the rebuild took, how the writer's latency suffered, the longest
lock wait seen, and whether every counter is right afterwards (no increment lost).

Latency is measured open-loop: from when a write was due, not when it started, so a writer held
up behind a lock is charged for the writes that queued up behind it too.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

import dj

from . import counters

ANSWER = "INSERT INTO answers (question_id, body, approved) VALUES (%s, 'live', %s)"
BUMP_QUESTION = """
UPDATE questions SET answers_count = answers_count + 1,
       approved_answers_count = approved_answers_count + %s::int, updated_at = now()
WHERE id = %s
"""
ORDER = "INSERT INTO orders (user_id, amount, items_count) VALUES (%s, 9.99, %s) RETURNING id"
ORDER_ITEMS = "INSERT INTO order_items (order_id, item_id) SELECT %s, unnest(%s::bigint[])"
BUMP_USER = "UPDATE users SET orders_count = orders_count + 1, updated_at = now() WHERE id = %s"
# Items in id order, so that two writers bumping the same items cannot deadlock.
BUMP_ITEMS = """
UPDATE items SET orders_count = orders_count + n.count, updated_at = now()
FROM (SELECT item_id, count(*) AS count FROM unnest(%s::bigint[]) AS item_id GROUP BY item_id) AS n
WHERE items.id = n.item_id
"""
# The writers' waits on locks, sampled: a statement waiting on a lock, and for how long so far.
LOCK_WAITS = """
SELECT coalesce(max(extract(epoch FROM clock_timestamp() - query_start)), 0)::float8
FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'
"""
ORDER_SHARE = 0.2  # of the writes; the rest are answers
# The rake task's way commits once per record (a WAL flush each, ~5 ms here): at the demo's
# 100,000 questions that is minutes, so it visits only the first ids of each table.
RECORDS_LIMIT = 5_000


@dataclass
class WriterStats:
    writes: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    max_lock_wait_ms: float

    def percentile(self, pct: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else 0.0

    def summary(self) -> dict:
        return {"writes": self.writes, "rate_per_s": self.writes / self.seconds if self.seconds else 0.0,
                "p50_ms": self.percentile(50), "p99_ms": self.percentile(99),
                "max_ms": max(self.latencies_ms, default=0.0), "max_lock_wait_ms": self.max_lock_wait_ms}


class Writer:
    """`connections` threads writing `rate` transactions a second in all, until stop()."""

    def __init__(self, url: str, rate: float = 200.0, connections: int = 4, seed: int = 1):
        self.url, self.rate, self.connections = url, rate, connections
        self.random = random.Random(seed)
        self._stop = threading.Event()
        self._latencies: list[float] = []
        self._lock = threading.Lock()
        self._pids: list[int] = []
        self._max_wait = 0.0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        with dj.connect(url) as conn:
            self.questions = conn.execute("SELECT min(id), max(id) FROM questions").fetchone()
            self.users = [r[0] for r in conn.execute("SELECT id FROM users")]
            self.items = [r[0] for r in conn.execute("SELECT id FROM items")]

    def __enter__(self) -> "Writer":
        if self.questions[0] is None:
            raise dj.DJError("the live writer needs questions to answer: seed the Q&A board first")
        self._started = time.perf_counter()
        ready = threading.Barrier(self.connections + 2)
        for i in range(self.connections):
            self._spawn(self._write, i, ready)
        self._spawn(self._watch_locks, ready)
        ready.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> WriterStats:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        if self._errors:
            raise dj.DJError(f"the live writer failed: {self._errors[0]!r}")
        return WriterStats(len(self._latencies), time.perf_counter() - self._started, list(self._latencies),
                           self._max_wait * 1000)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _write(self, index: int, ready: threading.Barrier) -> None:
        try:
            with dj.connect(self.url, autocommit=True) as conn:
                with self._lock:
                    self._pids.append(conn.info.backend_pid)
                pick = random.Random(self.random.random())
                interval = self.connections / self.rate
                ready.wait()
                due = time.perf_counter() + interval * index / self.connections
                while not self._stop.is_set():
                    now = time.perf_counter()
                    if now < due:
                        time.sleep(due - now)
                    self._one(conn, pick)
                    with self._lock:
                        self._latencies.append((time.perf_counter() - due) * 1000)
                    due += interval
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self._errors.append(exc)
            ready.abort()

    def _one(self, conn: psycopg.Connection, pick: random.Random) -> None:
        with conn.transaction():
            if self.users and self.items and pick.random() < ORDER_SHARE:
                items = [pick.choice(self.items) for _ in range(pick.randint(1, 6))]
                user = pick.choice(self.users)
                order = conn.execute(ORDER, (user, len(items))).fetchone()[0]
                conn.execute(ORDER_ITEMS, (order, items))
                conn.execute(BUMP_USER, (user,))
                conn.execute(BUMP_ITEMS, (items,))
            else:
                question, approved = pick.randint(*self.questions), pick.random() < 0.3
                conn.execute(ANSWER, (question, approved))
                conn.execute(BUMP_QUESTION, (approved, question))

    def _watch_locks(self, ready: threading.Barrier) -> None:
        try:
            with dj.connect(self.url, autocommit=True) as conn:
                ready.wait()
                while not self._stop.wait(0.005):
                    with self._lock:
                        pids = list(self._pids)
                    self._max_wait = max(self._max_wait, conn.execute(LOCK_WAITS, (pids,)).fetchone()[0])
        except BaseException as exc:  # noqa: BLE001
            self._errors.append(exc)
            ready.abort()


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    enqueue: Callable[[str, int], int]  # (queue, batch) -> jobs enqueued


def _serial(queue: str, batch: int) -> int:
    counters.rebuild_all_serial.using(queue=queue).enqueue("all")
    return 1


def _batched(queue: str, batch: int) -> int:
    return len(counters.enqueue_rebuild(batch, queue=queue))


def _records_serial(queue: str, batch: int) -> int:
    counters.rebuild_records_job.using(queue=queue).enqueue("all", limit=RECORDS_LIMIT)
    return 1


def _records_batched(queue: str, batch: int) -> int:
    with dj.connect() as conn:
        ranges = [(table, first, last) for table in counters.TABLES
                  for first, last in counters.plan_ranges(conn, table, batch)[:max(1, RECORDS_LIMIT // batch)]]
    counters.rebuild_records_job.using(queue=queue).enqueue_many(ranges)
    return len(ranges)


MODES = (
    Mode("serial", "(a) set-based, 1 job", _serial),
    Mode("batched", "(b) set-based, {batch}-id jobs", _batched),
    Mode("records_serial", "(c) per record*, 1 job", _records_serial),
    Mode("records_batched", "(c) per record*, {batch}-id jobs", _records_batched),
)
PER_RECORD = ("records_serial", "records_batched")


def run_mode(mode: Mode, queue: str, drain: Callable[[str], None], *, batch: int = 1000, rate: float = 200.0,
             damage: float = 0.1, settle_s: float = 0.5) -> dict:
    """Damage the counters, then rebuild them `mode`'s way while a Writer writes; returns the figures.

    `drain(label)` waits until the queue's jobs are done (the demo's running workers)."""
    url = dj.database_url()
    if mode.key not in PER_RECORD:  # those visit only the first ids: damage elsewhere would stay
        with dj.connect() as conn:
            counters.corrupt(conn, damage)
    with Writer(url, rate) as writer:
        time.sleep(settle_s)
        started = time.perf_counter()
        jobs = mode.enqueue(queue, batch)
        drain(mode.label.format(batch=batch))
        rebuild_s = time.perf_counter() - started
        time.sleep(settle_s)
        stats = writer.stop()
    with dj.connect() as conn:
        wrong = counters.check(conn)
    # A counter below its true count lost increments; one above it kept damage the rebuild missed.
    lost = sum(max(0, m["actual"] - m["cached"]) for m in wrong)
    return {"mode": mode.key, "label": mode.label.format(batch=batch), "jobs": jobs, "rebuild_s": rebuild_s,
            "writer": stats.summary(), "wrong_counters": len(wrong), "lost_increments": lost}


def baseline(rate: float = 200.0, seconds: float = 2.0) -> dict:
    """The writer alone, with no rebuild: what its latency is when nothing competes."""
    with Writer(dj.database_url(), rate) as writer:
        time.sleep(seconds)
        stats = writer.stop()
    return {"mode": "none", "label": "no rebuild", "jobs": 0, "rebuild_s": 0.0, "writer": stats.summary(),
            "wrong_counters": None, "lost_increments": None}
