"""`dj demo`: the whole workload end to end, with timings.

1. Seed the storefront in slow mode twice: one big job per generator, then one job
   per record, both on the same workers. Big jobs cannot use more than one thread each.
2. Seed the Q&A board in fast mode, in jobs that the two worker processes share.
3. Damage the counter caches, rebuild them with one serial job, damage them again,
   rebuild them with batched jobs of 1000 ids, and check them.
4. The same rebuilds under live traffic (tasks/live.py): a writer adds answers and orders at a
   fixed rate, bumping their counters, while the counters are rebuilt each way; its latency, the
   longest lock wait and the lost increments show what batching buys a live app.

It empties the workload tables first. It works a queue of its own, "demo", so it never
runs, or deletes, the user's jobs.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import dj
from dj import job

from . import counters, live, seed

QUEUE = "demo"
# The tables of tasks/schema.py, named here so that the worker does not import SQLAlchemy.
WORKLOAD_TABLES = ("users", "items", "orders", "order_items", "questions", "answers")
PROCESSES = 2
THREADS = 10
REBUILD_BATCH = 1000
CORRUPT_FRACTION = 0.1
QA_JOBS = 20
LIVE_RATE = 200  # the live writer's transactions per second


@dataclass(frozen=True)
class Scale:
    users: int
    items: int
    orders: int
    questions: int
    answers: int


SCALES = {
    "small": Scale(users=4, items=4, orders=2, questions=2_000, answers=20_000),
    "default": Scale(users=30, items=40, orders=30, questions=100_000, answers=1_000_000),
    "large": Scale(users=60, items=80, orders=60, questions=1_000_000, answers=10_000_000),
}


class DemoFailed(dj.WorkFailed):
    """Some demo jobs did not succeed, or the counters are still wrong after the rebuild."""


@job(name="tasks.demo.noop")
def noop(*args, **kwargs) -> None:
    pass


def reset(tables: tuple[str, ...] = WORKLOAD_TABLES) -> None:
    with dj.connect() as conn:
        conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


def _work(url: str) -> None:
    dj.use_database(url)
    dj.run_workers(queues=[QUEUE], concurrency=THREADS, processes=PROCESSES, stop_with_parent=True)


class _Workers:
    """Long-running workers on the demo queue, started once, like workers already running in
    other terminals: the timings are then from enqueue to the last job done, without the
    workers' start-up."""

    def __init__(self, console: Console):
        self.console = console
        self.process: multiprocessing.process.BaseProcess | None = None

    def __enter__(self) -> "_Workers":
        with dj.connect(autocommit=True) as conn:
            since = conn.execute("SELECT now()").fetchone()[0]
            self.process = multiprocessing.get_context("spawn").Process(
                target=_work, args=(dj.database_url(),), name="dj-demo-workers"
            )
            self.process.start()
            deadline = time.monotonic() + 60
            while conn.execute(
                "SELECT count(*) FROM workers WHERE %s = ANY(queues) AND started_at >= %s",
                (QUEUE, since),
            ).fetchone()[0] < PROCESSES:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise DemoFailed("the demo's workers did not start within 60 s")
                time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        # SIGTERM: the supervisor forwards it, and the workers finish their jobs and exit.
        self.process.terminate()
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def _check_alive(self) -> None:
        if not self.process.is_alive():
            raise DemoFailed(f"the demo's workers exited with code {self.process.exitcode}")

    def drain(self, label: str) -> None:
        """Wait, with a progress bar, until every job in the demo queue has succeeded."""
        progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        with dj.connect(autocommit=True) as conn, progress:
            bar = None
            while True:
                pending, dead = conn.execute(
                    """
                    SELECT count(*) FILTER (WHERE failed_at IS NULL),
                           count(*) FILTER (WHERE failed_at IS NOT NULL)
                    FROM jobs WHERE queue = %s
                    """,
                    (QUEUE,),
                ).fetchone()
                if bar is None:
                    bar = progress.add_task(label, total=pending)
                progress.update(bar, completed=progress.tasks[bar].total - pending)
                if dead:
                    raise DemoFailed(
                        f"{dead} demo job(s) failed for good; see 'dj jobs list --queue {QUEUE}'"
                    )
                if not pending:
                    return
                self._check_alive()
                time.sleep(0.02)


def _seed_storefront(workers: _Workers, scale: Scale, per_job: int | None, label: str) -> tuple[float, int]:
    """Parents first, then orders: an order job that finds no user or item would be retried
    seconds later, after the burst workers have left."""
    reset(("users", "items", "orders", "order_items"))
    started = time.perf_counter()
    parents = seed.enqueue_seed(
        users=scale.users, items=scale.items, orders=0, per_job=per_job, slow=True, queue=QUEUE
    )
    workers.drain(f"{label}: users, items")
    children = seed.enqueue_seed(
        users=0, items=0, orders=scale.orders, per_job=per_job, slow=True, queue=QUEUE
    )
    workers.drain(f"{label}: orders")
    jobs = sum(s["jobs"] for s in parents.values()) + sum(s["jobs"] for s in children.values())
    return time.perf_counter() - started, jobs


def _seed_qa(workers: _Workers, scale: Scale) -> tuple[float, int]:
    started = time.perf_counter()
    parents = seed.enqueue_seed(
        users=0, items=0, orders=0, questions=scale.questions,
        per_job=max(1, -(-scale.questions // QA_JOBS)), queue=QUEUE,
    )
    workers.drain("Q&A: questions")
    children = seed.enqueue_seed(
        users=0, items=0, orders=0, answers=scale.answers,
        per_job=max(1, -(-scale.answers // QA_JOBS)), queue=QUEUE,
    )
    workers.drain("Q&A: answers")
    return time.perf_counter() - started, parents["questions"]["jobs"] + children["answers"]["jobs"]


def _vacuum() -> float:
    """Fresh statistics and visibility map after the bulk load, as after any big import,
    so that both rebuilds run against the plans a settled database would get."""
    started = time.perf_counter()
    with dj.connect(autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {', '.join(WORKLOAD_TABLES)}")
    return time.perf_counter() - started


def _corrupt() -> int:
    with dj.connect() as conn:
        return counters.corrupt(conn, CORRUPT_FRACTION)


def _check(label: str) -> None:
    with dj.connect() as conn:
        wrong = counters.check(conn, limit=1000)
    if wrong:
        raise DemoFailed(f"{len(wrong)} counter(s) still wrong after the {label} rebuild")


def run(scale: str = "default", console: Console | None = None) -> dict:
    """Run the demo on the configured database; returns its timings in seconds."""
    if scale not in SCALES:
        raise dj.DJError(f"unknown scale {scale!r}; choose one of: {', '.join(SCALES)}")
    size = SCALES[scale]
    console = console or Console()

    dj.migrate()
    with dj.connect() as conn:
        # Leftovers of an interrupted demo would be counted as this run's work.
        conn.execute("DELETE FROM jobs WHERE queue = %s", (QUEUE,))
    reset()
    console.print(f"[bold]dj demo[/bold] ({scale}): {PROCESSES} worker processes x {THREADS} threads")

    with _Workers(console) as workers:
        big_s, big_jobs = _seed_storefront(workers, size, None, "storefront, big jobs")
        small_s, small_jobs = _seed_storefront(workers, size, 1, "storefront, small jobs")
        qa_s, qa_jobs = _seed_qa(workers, size)
        vacuum_s = _vacuum()

        corrupted_serial = _corrupt()
        started = time.perf_counter()
        counters.rebuild_all_serial.using(queue=QUEUE).enqueue("all")
        workers.drain("rebuild: one serial job")
        serial_s = time.perf_counter() - started
        _check("serial")

        corrupted_batched = _corrupt()
        started = time.perf_counter()
        ranges = counters.enqueue_rebuild(REBUILD_BATCH, queue=QUEUE)
        workers.drain(f"rebuild: {len(ranges)} jobs of {REBUILD_BATCH} ids")
        batched_s = time.perf_counter() - started
        _check("batched")

        live_rows = _live(workers)

    timings = {
        "scale": scale,
        "storefront_records": size.users + size.items + size.orders,
        "storefront_big_jobs_s": big_s,
        "storefront_big_jobs": big_jobs,
        "storefront_small_jobs_s": small_s,
        "storefront_small_jobs": small_jobs,
        "storefront_speedup": big_s / small_s,
        "qa_questions": size.questions,
        "qa_answers": size.answers,
        "qa_seed_s": qa_s,
        "qa_jobs": qa_jobs,
        "vacuum_analyze_s": vacuum_s,
        "corrupted_rows": corrupted_serial + corrupted_batched,
        "rebuild_serial_s": serial_s,
        "rebuild_batched_s": batched_s,
        "rebuild_batched_jobs": len(ranges),
        "rebuild_speedup": serial_s / batched_s,
        "mismatches": 0,
        "live": live_rows,
    }
    console.print(_summary(timings))
    console.print(_live_summary(live_rows))
    return timings


def _live(workers: _Workers) -> list[dict]:
    """Step 4: the writer alone, then each way of rebuilding while it writes."""
    rows = [live.baseline(LIVE_RATE)]
    for mode in live.MODES:
        rows.append(live.run_mode(mode, QUEUE, workers.drain, batch=REBUILD_BATCH, rate=LIVE_RATE))
    lost = [r for r in rows if r["mode"] not in live.PER_RECORD and r["wrong_counters"]]
    if lost:  # dj's own rebuilds promise every increment survives (tasks/counters.py)
        raise DemoFailed(f"{lost[0]['label']}: {lost[0]['wrong_counters']} counter(s) wrong after a rebuild "
                         "under live writes")
    counters.enqueue_rebuild(REBUILD_BATCH, queue=QUEUE)  # repair what the rake task's way lost
    workers.drain("rebuild: repair")
    _check("repair")
    return rows


def _live_summary(rows: list[dict]) -> Table:
    table = Table("rebuild", "jobs", "seconds", "writes: p50/p99/max ms", "lock wait", "increments lost",
                  title=f"counters rebuilt while the app writes {LIVE_RATE} transactions/s")
    for r in rows:
        w = r["writer"]
        table.add_row(r["label"], str(r["jobs"] or ""), f"{r['rebuild_s']:.2f}" if r["jobs"] else "",
                      f"{w['p50_ms']:.0f} / {w['p99_ms']:.0f} / {w['max_ms']:.0f}",
                      f"{w['max_lock_wait_ms']:.0f} ms", "" if r["lost_increments"] is None else str(r["lost_increments"]))
    by = {r["mode"]: r for r in rows}
    caption = [f"* the first {live.RECORDS_LIMIT:,} ids of each table: one commit per record takes minutes for all"]
    if "serial" in by and "batched" in by:
        a, b = by["serial"], by["batched"]
        caption.insert(0, f"batched vs 1 job: {a['rebuild_s'] / b['rebuild_s']:.1f}x the speed; the writes' p99 "
                          f"{b['writer']['p99_ms']:.0f} ms against {a['writer']['p99_ms']:.0f} ms, the longest lock "
                          f"wait {b['writer']['max_lock_wait_ms']:.0f} ms against {a['writer']['max_lock_wait_ms']:.0f} ms")
    table.caption = "\n".join(caption)
    return table


def _summary(t: dict) -> Table:
    table = Table("step", "jobs", "seconds", "notes", title=f"dj demo ({t['scale']})")
    table.add_row(
        f"storefront: {t['storefront_records']} slow records",
        str(t["storefront_big_jobs"]), f"{t['storefront_big_jobs_s']:.2f}", "one big job per generator",
    )
    table.add_row(
        "storefront: small jobs",
        str(t["storefront_small_jobs"]), f"{t['storefront_small_jobs_s']:.2f}",
        f"one per record: {t['storefront_speedup']:.1f}x faster",
    )
    rows = t["qa_questions"] + t["qa_answers"]
    table.add_row(
        f"Q&A: {t['qa_questions']:,} q, {t['qa_answers']:,} a",
        str(t["qa_jobs"]), f"{t['qa_seed_s']:.2f}", f"COPY, {rows / t['qa_seed_s']:,.0f} rows/s",
    )
    table.add_row("VACUUM ANALYZE", "", f"{t['vacuum_analyze_s']:.2f}", "after the bulk load")
    table.add_row(
        "counters: one serial rebuild", "1", f"{t['rebuild_serial_s']:.2f}",
        f"{CORRUPT_FRACTION:.0%} of counters damaged",
    )
    table.add_row(
        f"counters: {REBUILD_BATCH} ids per job",
        str(t["rebuild_batched_jobs"]), f"{t['rebuild_batched_s']:.2f}",
        f"{t['rebuild_speedup']:.1f}x the serial speed",
    )
    table.add_row("counters check", "", "", "all counters correct")
    return table


def run_work_it(forms: int = 200, clients: int = 10, console: Console | None = None) -> list[dict]:
    """`dj demo work-it`: the tutorials' app, mail sent inside the request against enqueued
    (examples/work_it/loadtest.py). The app lives in the checkout's examples/, as a user's app
    would live in its own project, so this needs a checkout."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "examples" / "work_it" / "app.py").is_file():
        raise dj.DJError(f"dj demo work-it runs the app in examples/work_it of a dj checkout; there is none at {root}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from examples.work_it import loadtest

    console = console or Console()
    console.print(f"[bold]dj demo work-it[/bold]: {forms} forms from {clients} concurrent clients, mail sent "
                  "in the request, then enqueued")
    rows = loadtest.run(forms=forms, clients=clients)
    table = Table("mail sent", "p50 ms", "p95 ms", "p99 ms", "requests/s", "last mail after", "mails / forms",
                  title="work-it: response time")
    for r in rows:
        table.add_row("in the request" if r["mode"] == "inline" else "enqueued",
                      f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['requests_per_s']:.0f}",
                      f"{r['last_mail_s']:.2f} s", f"{r['mails']} / {r['forms']}")
    by = {r["mode"]: r for r in rows}
    if len(by) == 2:
        table.caption = (f"enqueueing makes the request {by['inline']['p50_ms'] / by['queued']['p50_ms']:.1f}x faster "
                         "at the median")
    console.print(table)
    bad = [r for r in rows if r["mails"] != r["forms"] or r["distinct_recipients"] != r["forms"]]
    if bad:
        raise DemoFailed(f"{bad[0]['mode']}: {bad[0]['mails']} mails for {bad[0]['forms']} forms")
    return rows
