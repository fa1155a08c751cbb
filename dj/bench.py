"""`dj bench`: the performance figures of the performance issue, measured in one run.

Every measurement runs against the configured database (the embedded server by default) on
queues of its own, named `bench-<run>-<part>`, so it never claims, counts or deletes anyone else's
jobs; its rows, statistics and worker rows are removed at the end, even after an error or Ctrl-C.
Two parts need tables of their own and get a scratch database on the same server, created and
dropped by the run: the counter rebuild (the Q&A board it seeds) and the peers (procrastinate,
pgqueuer and oban-py install their schemas there).

Workers run as real `dj work` processes, started before the jobs are enqueued and idle until
then: a drain is timed from the commit of the `enqueue_many` that fills the queue (the NOTIFY
wakes the workers) to the moment no job of the queue is left, so interpreter start-up is never
counted.

On a 2-core machine a 10,000-job drain takes a tenth of a second, and one slow fsync streak can
halve it. So each drain, the plain-SQL ceiling and the bulk enqueue are the median of ROUNDS runs,
single enqueues the median of alternating blocks, and the rebuild the median of REBUILD_ROUNDS
rounds after a warm-up.

Python API: `run_bench(jobs=10000, processes=(1, 2), peers=False, quick=False, progress=None)`
returns the result document that `dj bench --json` prints.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg import sql as pgsql

from . import bench_async, bench_async_drain, bench_deps, bench_keep, bench_pooler, bench_snapshot, config, db
from .context import current_job
from .bench_peers import PEERS, log_tail
from .errors import DJError
from .task import job

Progress = Callable[[str, int, int], None]
"""progress(description, steps_done, steps_total): called as each step starts."""

DEFAULT_JOBS = 10_000
QUICK_JOBS = 2_000
LATENCY_RATE = 200  # enqueues per second
LATENCY_SECONDS, QUICK_LATENCY_SECONDS = 5.0, 1.0
SOAK_JOBS, QUICK_SOAK_JOBS = 1_000_000, 20_000
SOAK_ROUND = 100_000
REBUILD_SIZE = (100_000, 1_000_000)  # questions, answers
QUICK_REBUILD_SIZE = (2_000, 20_000)
REBUILD_BATCH = 1_000
REBUILD_PROCESSES = 2
REBUILD_ROUNDS = 3  # measured, after one warm-up round; the figures are their medians
RAW_BATCH = 100
# dj's async drain should be at least 10x theirs (issue 13).
PEERS_10X = ("oban", "pgqueuer")
# What `dj bench --only` can pick, in the order a full run measures them.
SECTIONS = ("bulk", "single", "async-single", "drain", "keep", "deps", "latency", "pgbouncer", "soak", "old-snapshot", "fairness",
            "rebuild", "peers")
ROUNDS = 3  # the drains, the plain-SQL ceiling and the bulk enqueue are each the median of this many

# The plain-SQL ceiling of the issue: claim and delete in batches, nothing else.
RAW_CLAIM_DELETE = f"""
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs
    WHERE queue = %s AND locked_by IS NULL AND failed_at IS NULL AND limit_key IS NULL
    ORDER BY priority, run_at, id
    LIMIT {RAW_BATCH}
    FOR UPDATE SKIP LOCKED)
RETURNING id
"""

# The reference for single enqueues: one bare INSERT per round trip, autocommit, no NOTIFY. The
# columns left out take their defaults, which are what a no-op job of the default queue gets.
BARE_INSERT = "INSERT INTO jobs (queue, task) VALUES (%s, %s) RETURNING id"

# Written so that each half can be answered from a partial index (the claim index, the
# locked-jobs index) instead of scanning the heap and its dead tuples on every poll. Dead jobs
# (failed_at set) do not count as pending; a drain checks for them separately.
REBUILD_PENDING = """
SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = %(q)s AND failed_at IS NULL AND task <> 'counters.check_batch')
"""

PENDING = """
SELECT EXISTS (SELECT 1 FROM jobs WHERE queue = %(q)s AND locked_by IS NULL AND failed_at IS NULL
               AND limit_key IS NULL)
    OR EXISTS (SELECT 1 FROM jobs WHERE queue = %(q)s AND locked_by IS NULL AND failed_at IS NULL
               AND limit_key IS NOT NULL)
    OR EXISTS (SELECT 1 FROM jobs WHERE locked_by IS NOT NULL AND queue = %(q)s)
"""


# --- the bench's own jobs -------------------------------------------------------------------------
# Worker processes started by the bench import this module through DJ_TASKS.

@job(name="dj.bench.noop")
def noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing: what the drain measures is the queue's own cost per job."""


@job(name="dj.bench.stamp")
def stamp(table: str) -> None:
    """Record when this job started, for the enqueue-to-start latency."""
    started = time.time()
    ctx = current_job()
    with db.pool().connection() as conn:
        conn.execute(pgsql.SQL("INSERT INTO {} (job_id, started) VALUES (%s, %s)").format(pgsql.Identifier(table)),
                     (ctx.id if ctx else 0, started))


# --- helpers --------------------------------------------------------------------------------------

def parse_processes(text: str) -> tuple[int, ...]:
    """`--processes`: "2" means 1 and 2 processes; "1,4" means exactly 1 and 4."""
    try:
        if "," in text:
            values = sorted({int(part) for part in text.split(",") if part.strip()})
        else:
            values = list(range(1, int(text) + 1))
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DJError(f"--processes {text!r} must be a positive integer or a list like 1,2")
    return tuple(values)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


class _Steps:
    def __init__(self, progress: Progress | None, total: int):
        self.progress = progress
        self.total = total
        self.done = -1

    def start(self, description: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(description, min(self.done, self.total), self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


class _WorkerPool:
    """`dj work --processes P` on the given queues, as a real subprocess, started and waited for
    until every process has registered (so its start-up is not timed), stopped with SIGTERM."""

    def __init__(self, url: str, queues: list[str], processes: int, env: dict[str, str] | None = None):
        self.url, self.env = url, env or {}
        self.queues = queues
        self.processes = processes
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="dj-bench-workers-", suffix=".log", delete=False)

    def __enter__(self) -> "_WorkerPool":
        tasks = ",".join(filter(None, [os.environ.get("DJ_TASKS", ""), __name__]))
        env = {**os.environ, "DJ_DATABASE_URL": self.url, "DJ_TASKS": tasks, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dj", "work", "--queues", ",".join(self.queues),
             "--processes", str(self.processes), "--database-url", self.url],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
            start_new_session=True)  # the bench stops it; a Ctrl-C meant for the bench must not
        try:
            with db.connect(self.url, autocommit=True) as conn:
                deadline = time.monotonic() + 120
                while conn.execute("SELECT count(*) FROM workers WHERE %s = ANY(queues)",
                                   (self.queues[0],)).fetchone()[0] < self.processes:
                    self.check()
                    if time.monotonic() > deadline:
                        raise DJError(f"bench workers did not start within 120 s; see {self.log.name}")
                    time.sleep(0.05)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        time.sleep(0.3)  # the listener connects and LISTENs just after the worker registers
        return self

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DJError(f"bench workers exited with code {self.proc.returncode}: {log_tail(self.log.name)}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        if not exc or exc[0] is None:  # after a failure the log stays, named in the error
            try:
                os.unlink(self.log.name)
            except OSError:
                pass


# --- the run --------------------------------------------------------------------------------------

class _Bench:
    def __init__(self, url: str, jobs: int, processes: tuple[int, ...], peers: bool, quick: bool,
                 progress: Progress | None, soak_jobs: int, latency_s: float, rebuild_size: tuple[int, int],
                 only: frozenset[str] | None = None):
        self.url = url
        self.only = only
        self.jobs = jobs
        self.processes = processes
        self.peers = peers
        self.quick = quick
        self.soak_jobs = soak_jobs
        self.soak_round = min(SOAK_ROUND, max(1, soak_jobs // 5)) if quick else min(SOAK_ROUND, soak_jobs)
        self.latency_s = latency_s
        self.rebuild_size = rebuild_size
        self.run = uuid.uuid4().hex[:8]
        self.prefix = f"bench-{self.run}-"
        self.latency_table = f"dj_bench_latency_{self.run}"
        self.scratch_db = f"dj_bench_{self.run}"
        self.scratch_url: str | None = None
        self.notes: list[str] = []
        soak_rounds = math.ceil(soak_jobs / self.soak_round) if soak_jobs else 0
        # setup, bulk, single, drains, latency, soak rounds, rebuild steps, peers, cleanup
        total = 3 + len(processes) + 1 + soak_rounds + 1 + 2 * (REBUILD_ROUNDS + 1) + (len(PEERS) * (1 + len(processes)) if peers else 0) + 1
        total += bench_snapshot.STEPS + 1 + 2  # + async-single + through PgBouncer
        total += 1  # fairness
        total += bench_async_drain.PROCESSES in processes
        total += 1  # keep
        total += 1  # deps
        self.steps = _Steps(progress, total)

    def queue(self, part: str) -> str:
        return self.prefix + part

    def wants(self, section: str) -> bool:
        """Whether this run measures `section` (one of SECTIONS): all of them unless --only."""
        return self.only is None or section in self.only

    # --- orchestration ------------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.steps.start("setup: migrate, warm up")
        from .schema import migrate

        migrate(self.url)
        self.conn = db.connect(self.url, autocommit=True)
        result: dict[str, Any] = {"machine": self.machine()}
        try:
            if self.wants("bulk"):
                self.steps.start(f"enqueue_many {self.jobs:,} jobs, then the plain-SQL ceiling")
                result["enqueue_bulk_per_s"], result["raw_ceiling_per_s"] = self.bulk_and_raw()
            if self.wants("single"):
                self.steps.start("single enqueues vs bare INSERTs")
                (result["enqueue_single_per_s"], result["enqueue_single_own_conn_per_s"],
                 result["insert_single_per_s"]) = self.single()
            if self.wants("async-single"):
                result["async_single"] = bench_async.measure(self)
            biggest = max(self.processes)
            for p in self.processes:
                latency_here = self.wants("latency") and (p == 1 or (p == biggest and 1 not in self.processes))
                long_runs = p == biggest and (self.wants("soak") or self.wants("old-snapshot"))
                if not (self.wants("drain") or latency_here or long_runs):
                    continue
                q = self.queue(f"p{p}")
                with _WorkerPool(self.url, [q], p) as pool:
                    if self.wants("drain"):
                        self.steps.start(f"drain {self.jobs:,} jobs with {p} process{'es' if p > 1 else ''}")
                        result.setdefault("drain_per_s", {})[str(p)] = self.drain(pool, q, self.jobs)
                        if p == bench_async_drain.PROCESSES:
                            self.steps.start(f"drain {self.jobs:,} async jobs with {p} processes, alternating with sync")
                            result["drain_async"] = bench_async_drain.measure(self, pool, q)
                    if latency_here:
                        self.steps.start(f"latency: {LATENCY_RATE} enqueues/s for {self.latency_s:g} s")
                        result["latency_ms"] = self.latency(pool, q)
                    if p == biggest and self.wants("soak"):
                        result["soak"] = self.soak(pool, q, p)
                    if p == biggest and self.wants("old-snapshot"):
                        result["old_snapshot"] = bench_snapshot.measure(self, pool, q, self.soak_jobs)
            if self.wants("keep"):
                self.steps.start(f"drain {bench_keep.round_jobs(self):,} jobs with keep= and without, alternately")
                result["keep"] = bench_keep.measure(self)
            if self.wants("deps"):
                self.steps.start("drain jobs waiting for batches, and a chain of dependencies")
                result["deps"] = bench_deps.measure(self)
            if self.wants("pgbouncer"):
                self.steps.start("drain through PgBouncer, beside the direct drain")
                result["pgbouncer"] = bench_pooler.measure(self, _WorkerPool, ROUNDS)
            if self.wants("fairness"):
                # Imported here: it registers a task with a per-key limit, which the workers of the
                # other sections (they import this module) must not know (see dj.bench_fairness).
                from . import bench_fairness

                result["fairness"] = bench_fairness.measure(self, _WorkerPool)
            if self.wants("rebuild"):
                result["rebuild"] = self.rebuild()
            if self.peers or (self.only is not None and "peers" in self.only):
                result["peers"] = self.measure_peers()
        finally:
            self.steps.start("cleaning up")
            self.cleanup()
            self.steps.finish()
        result["config"] = {
            "only": sorted(self.only) if self.only is not None else None,
            "jobs": self.jobs, "processes": list(self.processes), "quick": self.quick,
            "soak_jobs": self.soak_jobs, "soak_round": self.soak_round, "latency_rate_per_s": LATENCY_RATE,
            "latency_s": self.latency_s, "rebuild_questions": self.rebuild_size[0],
            "rebuild_answers": self.rebuild_size[1], "rebuild_batch": REBUILD_BATCH,
            "rebuild_processes": REBUILD_PROCESSES, "raw_batch": RAW_BATCH,
            "worker_concurrency": "dj work default",
        }
        result["notes"] = self.notes
        result["elapsed_s"] = time.perf_counter() - started
        return result

    def machine(self) -> dict[str, Any]:
        settings = {name: self.conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]
                    for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")}
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:
            usable = os.cpu_count()
        try:
            from importlib.metadata import version

            dj_version = version("djq")  # the distribution's name; the package is dj
        except Exception:  # noqa: BLE001 - running from a source tree
            dj_version = "unknown"
        return {
            "cpu_count": os.cpu_count(),
            "cpus_usable": usable,
            # Other work on the machine skews every figure; this says how busy it was at the start.
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "postgresql": self.conn.execute("SHOW server_version").fetchone()[0],
            "postgresql_settings": settings,
            "server": "external" if (db._override or config.configured_url()) else "embedded",
            "python": platform.python_version(),
            "psycopg": psycopg.__version__,
            "dj": dj_version,
            "platform": platform.platform(),
        }

    # --- enqueue ------------------------------------------------------------------------------

    def bulk_and_raw(self) -> tuple[float, float]:
        """enqueue_many of `jobs` rows, then the plain-SQL loop draining them: each ROUNDS times,
        medians (a drain of 10,000 rows takes well under a second, so one run is noise)."""
        q = self.queue("raw")
        target = noop.using(queue=q)
        target.enqueue_many([()] * 50)  # warm-up: pool connection, statement preparation
        self.conn.execute("DELETE FROM jobs WHERE queue = %s", (q,))
        bulk, raw = [], []
        with db.connect(self.url, autocommit=True) as conn:
            for _ in range(ROUNDS):
                t = time.perf_counter()
                target.enqueue_many([()] * self.jobs)
                bulk.append(_rate(self.jobs, time.perf_counter() - t))
                done = 0
                t = time.perf_counter()
                while True:
                    rows = conn.execute(RAW_CLAIM_DELETE, (q,)).fetchall()
                    if not rows:
                        break
                    done += len(rows)
                raw.append(_rate(done, time.perf_counter() - t))
        return statistics.median(bulk), statistics.median(raw)

    def single(self) -> tuple[float, float, float]:
        """One job per enqueue() call, through dj's pool (a pooled connection, one statement with
        its NOTIFY) and on the caller's own connection, against a bare INSERT round trip on that
        same connection; in alternating blocks so that a load change hits all three alike."""
        q = self.queue("single")
        n = max(500, self.jobs // 10)
        blocks = 5
        per_block = math.ceil(n / blocks)
        params = (q, noop.name)
        with db.connect(self.url, autocommit=True) as conn:
            pooled, own = noop.using(queue=q), noop.using(queue=q, conn=conn)
            contenders = {
                "pooled": pooled.enqueue,
                "own": own.enqueue,
                "insert": lambda: conn.execute(BARE_INSERT, params).fetchone(),
            }
            rates: dict[str, list[float]] = {name: [] for name in contenders}
            for call in contenders.values():
                for _ in range(20):  # warm-up: psycopg prepares a statement after a few runs
                    call()
            for _ in range(blocks):
                for name, call in contenders.items():
                    t = time.perf_counter()
                    for _ in range(per_block):
                        call()
                    rates[name].append(_rate(per_block, time.perf_counter() - t))
        self.conn.execute("DELETE FROM jobs WHERE queue = %s", (q,))
        # Medians of the blocks: one slow fsync streak must not decide the figure.
        median = {name: statistics.median(rates[name]) for name in rates}
        return median["pooled"], median["own"], median["insert"]

    # --- draining -----------------------------------------------------------------------------

    def wait_empty(self, pool: Any, q: str, n: int, pending_sql: str = PENDING) -> float:
        """Poll until no job of `q` is pending; returns perf_counter() at that moment. The poll
        interval grows with the elapsed time (1% of it), so polling costs little and the
        measurement error stays near 1%."""
        started = time.perf_counter()
        deadline = started + max(300.0, n / 50)
        while True:
            now = time.perf_counter()
            if not self.conn.execute(pending_sql, {"q": q}).fetchone()[0]:
                return now
            pool.check()
            if now > deadline:
                raise DJError(f"bench queue {q} did not drain within {deadline - started:.0f} s")
            time.sleep(min(0.05, max(0.002, 0.01 * (now - started))))

    def fill_and_drain(self, pool: _WorkerPool, q: str, n: int) -> float:
        noop.using(queue=q).enqueue_many([()] * n)
        return self.timed_drain(pool, q, n)

    def timed_drain(self, pool: Any, q: str, n: int) -> float:
        """The rate at which `pool` drains the n jobs just committed to `q` (the commit's NOTIFY
        woke the workers), checked to have left no dead job."""
        t0 = time.perf_counter()
        t1 = self.wait_empty(pool, q, n)
        self.check_no_dead(q)
        return _rate(n, t1 - t0)

    def check_no_dead(self, q: str, conn: psycopg.Connection | None = None) -> None:
        row = (conn or self.conn).execute(
            "SELECT count(*), max(last_error) FROM jobs WHERE queue = %s AND failed_at IS NOT NULL", (q,)).fetchone()
        if row[0]:
            error = (row[1] or "").strip().splitlines()
            raise DJError(f"{row[0]} bench job(s) failed: {error[-1] if error else 'no error recorded'}")

    def drain(self, pool: _WorkerPool, q: str, n: int) -> float:
        """The median of ROUNDS drains of n jobs, after a warm-up (connections, prepared statements,
        the workers' buffer sized to the jobs)."""
        self.fill_and_drain(pool, q, min(n, 500))
        return statistics.median(self.fill_and_drain(pool, q, n) for _ in range(ROUNDS))

    # --- latency ------------------------------------------------------------------------------

    def latency(self, pool: _WorkerPool, q: str, seconds: float | None = None) -> dict[str, float]:
        table = pgsql.Identifier(self.latency_table)
        self.conn.execute(pgsql.SQL("CREATE UNLOGGED TABLE IF NOT EXISTS {} (job_id bigint PRIMARY KEY,"
                                    " started float8 NOT NULL)").format(table))
        target = stamp.using(queue=q)
        for _ in range(10):  # warm-up, not counted
            target.enqueue(self.latency_table)
            time.sleep(1 / LATENCY_RATE)
        self.wait_empty(pool, q, 10)
        self.conn.execute(pgsql.SQL("TRUNCATE {}").format(table))

        count = max(1, int(LATENCY_RATE * (self.latency_s if seconds is None else seconds)))
        sent: dict[int, float] = {}
        begin = time.perf_counter()
        for i in range(count):
            delay = begin + i / LATENCY_RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            job_id = target.enqueue(self.latency_table)
            sent[job_id] = time.time()  # the commit has been acknowledged
        self.wait_empty(pool, q, count)
        self.check_no_dead(q)
        rows = self.conn.execute(pgsql.SQL("SELECT job_id, started FROM {}").format(table)).fetchall()
        values = sorted((started - sent[job_id]) * 1000 for job_id, started in rows if job_id in sent)
        if len(values) < count:
            self.notes.append(f"latency: only {len(values)} of {count} stamped jobs were recorded")
        stragglers = sum(1 for v in values if v > 1000)
        if stragglers:
            self.notes.append(f"latency: {stragglers} of {len(values)} jobs started more than 1 s after their"
                              f" enqueue (worst {values[-1] / 1000:.1f} s): a NOTIFY that did not wake the"
                              " worker, so only its poll found the job")
        return {"p50": percentile(values, 50), "p95": percentile(values, 95), "p99": percentile(values, 99),
                "max": values[-1] if values else math.nan, "mean": sum(values) / len(values) if values else math.nan,
                "samples": len(values)}

    # --- soak ---------------------------------------------------------------------------------

    def round_counters(self) -> dict[str, int]:
        """Checkpoints the server has begun, and dj's vacuums of jobs (the maintenance lease's runs)."""
        checkpoints = ("SELECT num_timed + num_requested FROM pg_stat_checkpointer"  # PostgreSQL 17 on
                       if self.conn.info.server_version >= 170000 else
                       "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
        row = self.conn.execute(
            f"SELECT ({checkpoints}), (SELECT coalesce(sum(runs), 0) FROM maintenance WHERE name = 'vacuum jobs')"
        ).fetchone()
        return {"checkpoints": int(row[0]), "vacuums": int(row[1])}

    def table_bytes(self) -> int:
        return self.conn.execute("SELECT pg_total_relation_size('jobs')").fetchone()[0]

    def soak(self, pool: _WorkerPool, q: str, processes: int) -> dict[str, Any]:
        before = peak = self.table_bytes()
        rates: list[float] = []
        # What may slow a round, per round: checkpoints begun and dj's own vacuums of jobs.
        events: list[dict[str, int]] = []
        done = 0
        rounds = math.ceil(self.soak_jobs / self.soak_round)
        for r in range(rounds):
            n = min(self.soak_round, self.soak_jobs - done)
            self.steps.start(f"soak: round {r + 1}/{rounds}, {done + n:,} of {self.soak_jobs:,} jobs"
                             f" ({processes} process{'es' if processes > 1 else ''})")
            counters = self.round_counters()
            noop.using(queue=q).enqueue_many([()] * n)
            t0 = time.perf_counter()
            peak = max(peak, self.table_bytes())
            t1 = self.wait_empty(pool, q, n)
            self.check_no_dead(q)
            rates.append(_rate(n, t1 - t0))
            events.append({k: v - counters[k] for k, v in self.round_counters().items()})
            done += n
        after = self.table_bytes()
        first, last = (rates[0], rates[-1]) if rates else (math.nan, math.nan)
        return {"jobs": done, "round": self.soak_round, "processes": processes, "first_per_s": first,
                "last_per_s": last, "ratio": last / first if rates else math.nan, "rounds_per_s": rates,
                "rounds_events": events,
                "table_bytes_before": before, "table_bytes_peak": peak, "table_bytes_after": after}

    # --- scratch database: the rebuild and the peers ------------------------------------------

    def scratch(self) -> str:
        if self.scratch_url is None:
            self.conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(self.scratch_db)))
            self.scratch_url = conninfo.make_conninfo(self.url, dbname=self.scratch_db)
        return self.scratch_url

    def rebuild(self) -> dict[str, Any]:
        questions, answers = self.rebuild_size
        self.steps.start(f"rebuild: seed {questions:,} questions, {answers:,} answers")
        empty = {"serial_s": math.nan, "batched_s": math.nan, "ratio": math.nan}
        try:
            from tasks import counters, seed
        except ImportError as exc:
            self.notes.append(f"rebuild: the workload in tasks/ cannot be imported ({exc})")
            return empty
        try:
            url = self.scratch()
        except psycopg.errors.InsufficientPrivilege:
            self.notes.append("rebuild: not measured, the database user may not CREATE DATABASE and the"
                              " bench does not write into the workload's own tables")
            return empty
        from .schema import migrate

        migrate(url)
        with db.connect(url, autocommit=True) as conn:
            seed.insert_questions(conn, questions)
            seed.insert_answers(conn, answers)
        q = self.queue("rebuild")
        saved = db._override
        db.use_database(url)  # enqueue_rebuild plans and enqueues on "the" database
        serial, batched, correct = [], [], True
        try:
            with _WorkerPool(url, [q], REBUILD_PROCESSES) as pool, db.connect(url, autocommit=True) as conn:
                # Round 0 warms the workers (their job connections, PostgreSQL's caches) and is
                # not counted, as the drains have their warm-up; the rounds alternate so that
                # drift on a noisy machine hits both sides alike.
                for round_ in range(REBUILD_ROUNDS + 1):
                    label = "warm-up" if round_ == 0 else f"{round_}/{REBUILD_ROUNDS}"
                    self.steps.start(f"rebuild {label}: one serial job")
                    self.reset_counters(conn)
                    t = time.perf_counter()
                    counters.rebuild_all_serial.using(queue=q).enqueue("all")
                    serial_s = self.wait_rebuild(pool, conn, q) - t
                    correct &= not counters.check(conn, limit=1)

                    self.steps.start(f"rebuild {label}: jobs of {REBUILD_BATCH} ids on {REBUILD_PROCESSES} processes")
                    self.reset_counters(conn)
                    t = time.perf_counter()
                    ranges = counters.enqueue_rebuild(REBUILD_BATCH, table="all", queue=q)
                    batched_s = self.wait_rebuild(pool, conn, q) - t
                    correct &= not counters.check(conn, limit=1)
                    # The batch's callback (a full counters check) runs now; it must not overlap
                    # the next round's serial rebuild.
                    self.wait_rebuild(pool, conn, q, pending_sql=PENDING)
                    if round_:
                        serial.append(serial_s)
                        batched.append(batched_s)
        finally:
            db.use_database(saved)
            stale = db._pools.pop(url, None)
            if stale is not None:
                stale.close()
        if not correct:
            self.notes.append("rebuild: counters were still wrong after a rebuild")
        serial_s, batched_s = statistics.median(serial), statistics.median(batched)
        return {"questions": questions, "answers": answers, "serial_s": serial_s, "batched_s": batched_s,
                "ratio": batched_s / serial_s if serial_s > 0 else math.nan, "rounds": REBUILD_ROUNDS,
                "serial_runs_s": serial, "batched_runs_s": batched, "batched_jobs": len(ranges),
                "batch": REBUILD_BATCH, "processes": REBUILD_PROCESSES, "correct": correct}

    @staticmethod
    def reset_counters(conn: psycopg.Connection) -> None:
        """Both rebuilds start from the same state: every counter 0 (wrong), tables vacuumed."""
        conn.execute("UPDATE questions SET answers_count = 0, approved_answers_count = 0")
        conn.execute("VACUUM ANALYZE questions, answers")

    def wait_rebuild(self, pool: _WorkerPool, conn: psycopg.Connection, q: str,
                     pending_sql: str = REBUILD_PENDING) -> float:
        """When the last rebuild job is done. The batch's callback (a full counters check) runs
        afterwards and is not part of the rebuild's time (PENDING waits for it too)."""
        saved, self.conn = self.conn, conn
        try:
            t1 = self.wait_empty(pool, q, 1, pending_sql=pending_sql)
            self.check_no_dead(q)
            return t1
        finally:
            self.conn = saved

    def measure_peers(self) -> dict[str, Any]:
        from .bench_peers import measure  # the peers are a section of their own; most runs skip it

        return measure(self)


    # --- cleanup ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        like = self.prefix.replace("_", r"\_") + "%"
        try:
            with db.connect(self.url, autocommit=True) as conn:
                conn.execute("DELETE FROM jobs WHERE queue LIKE %s", (like,))
                conn.execute("DELETE FROM job_stats WHERE queue LIKE %s", (like,))
                conn.execute("DELETE FROM workers WHERE EXISTS (SELECT 1 FROM unnest(queues) AS q WHERE q LIKE %s)",
                             (like,))
                conn.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(pgsql.Identifier(self.latency_table)))
                if self.scratch_url is not None:
                    conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        pgsql.Identifier(self.scratch_db)))
        finally:
            if getattr(self, "conn", None) is not None:
                self.conn.close()




# --- the API --------------------------------------------------------------------------------------

def run_bench(jobs: int | None = None, processes: Iterable[int] = (1, 2), peers: bool = False,
              quick: bool = False, progress: Progress | None = None, *, soak_jobs: int | None = None,
              latency_s: float | None = None, rebuild_size: tuple[int, int] | None = None,
              only: Iterable[str] | None = None) -> dict[str, Any]:
    """Measure dj on the configured database; returns the document `dj bench --json` prints.

    `only` names the sections to measure (SECTIONS); None measures them all (and the peers only
    with `peers`).

    `jobs` (no-op jobs per drain and bulk enqueue) None means 10,000, or 2,000 with `quick`. `quick` also shrinks the soak (20,000 jobs),
    the latency run (1 s) and the rebuild (2k questions, 20k answers).
    """
    if jobs is None:
        jobs = QUICK_JOBS if quick else DEFAULT_JOBS
    if jobs < 1:
        raise DJError("--jobs must be at least 1")
    procs = tuple(sorted(set(processes)))
    if not procs or procs[0] < 1:
        raise DJError("process counts must be positive")
    sections = _sections(only)
    bench = _Bench(
        db.database_url(), jobs, procs, peers, quick, progress, only=sections,
        soak_jobs=soak_jobs if soak_jobs is not None else (QUICK_SOAK_JOBS if quick else SOAK_JOBS),
        latency_s=latency_s if latency_s is not None else (QUICK_LATENCY_SECONDS if quick else LATENCY_SECONDS),
        rebuild_size=rebuild_size or (QUICK_REBUILD_SIZE if quick else REBUILD_SIZE),
    )
    doc = bench.execute()
    # The key order first, then the rest.
    order = ["raw_ceiling_per_s", "enqueue_single_per_s", "enqueue_single_own_conn_per_s", "insert_single_per_s",
             "enqueue_bulk_per_s", "async_single",
             "drain_per_s", "drain_async", "latency_ms", "pgbouncer", "soak", "old_snapshot", "rebuild", "peers", "machine", "config", "notes", "elapsed_s"]
    return _finite({k: doc[k] for k in order if k in doc} | {k: v for k, v in doc.items() if k not in order})


def _sections(only: Iterable[str] | None) -> frozenset[str] | None:
    sections = None if only is None else frozenset(only)
    if sections is not None and (not sections or sections - set(SECTIONS)):
        raise DJError(f"unknown bench section(s) {', '.join(sorted(sections - set(SECTIONS))) or '(none)'}; "
                      f"choose from {', '.join(SECTIONS)}")
    return sections


# --- presentation ---------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """The document with NaN and infinity as null, so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _n(value: Any, unit: str = "/s") -> str:
    return f"{value:,.0f}{unit}" if _num(value) else "n/a"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if _num(a) and _num(b) and b else None


def _pct(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "n/a"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("[green]met[/green]" if ok else "[red]missed[/red]")


def table(doc: dict[str, Any]):
    """The result as one rich table, with the issue's goals beside the figures."""
    from rich.table import Table

    m = doc["machine"]
    c = doc["config"]
    t = Table("measurement", "result", "goal", "", title="dj bench", caption=(
        f"{m['cpus_usable']} CPUs (load {m['load_average_1m']:.1f} at start), PostgreSQL {m['postgresql']} "
        f"({m['server']}), Python {m['python']}. {c['jobs']:,} no-op jobs per drain and bulk enqueue; "
        f"dj workers with default concurrency, started before the jobs arrive; rebuild on "
        f"{c['rebuild_processes']} processes; {doc['elapsed_s']:.0f} s in all."))
    raw = doc.get("raw_ceiling_per_s")
    if "raw_ceiling_per_s" in doc:
        t.add_row(f"plain-SQL ceiling, batches of {RAW_BATCH}", _n(raw), "", "")
    drains = doc.get("drain_per_s", {})
    for p, rate in drains.items():
        goal, ok = "", None
        if p == "2" and raw is None:  # --only without the ceiling
            goal, ok = ">= 12,000/s", _num(rate) and rate >= 12_000
        elif p == "2":
            share = _ratio(rate, raw)
            goal = f">= 12,000/s, >= 50% of ceiling ({_pct(share)})"
            ok = _num(rate) and rate >= 12_000 and share is not None and share >= 0.5
        t.add_row(f"drain, {p} process{'es' if p != '1' else ''}", _n(rate), goal, _mark(ok))
    bench_async_drain.add_rows(t, doc, _n, _mark)
    bench_keep.add_rows(t, doc, _n, _mark)
    bench_deps.add_rows(t, doc, _n, _mark)
    bulk = doc.get("enqueue_bulk_per_s")
    if "enqueue_bulk_per_s" in doc:
        t.add_row("enqueue_many (bulk)", _n(bulk), ">= 100,000/s", _mark(_num(bulk) and bulk >= 100_000))
    if "insert_single_per_s" in doc:
        insert = doc["insert_single_per_s"]
        for label, key in (("enqueue, one per call, dj's pool", "enqueue_single_per_s"),
                           ("enqueue, one per call, caller's conn", "enqueue_single_own_conn_per_s")):
            share = _ratio(doc[key], insert)
            t.add_row(label, _n(doc[key]), f">= 80% of bare INSERT ({_pct(share)})",
                      _mark(share is not None and share >= 0.8))
        t.add_row("bare INSERT per round trip", _n(insert), "", "")
    lat = doc.get("latency_ms", {})
    if all(_num(lat.get(k)) for k in ("p50", "p95", "p99")):
        t.add_row(f"latency p50/p95/p99 at {LATENCY_RATE}/s",
                  f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms", "p50 <= 5 ms, p99 <= 25 ms",
                  _mark(lat["p50"] <= 5 and lat["p99"] <= 25))
    bench_pooler.add_rows(t, doc, _n, _mark)
    if "soak" in doc:
        s = doc["soak"]
        ratio = s.get("ratio")
        t.add_row(f"soak {s['jobs']:,}: first/last {s['round']:,}",
                  f"{_n(s['first_per_s'])} / {_n(s['last_per_s'])}", f">= 90% ({_pct(ratio)})",
                  _mark(ratio is not None and ratio >= 0.9))
        t.add_row("jobs table before/peak/after",
                  " / ".join(f"{s[k] / 2**20:.1f}" for k in ("table_bytes_before", "table_bytes_peak",
                                                            "table_bytes_after")) + " MiB", "bounded", "")
    bench_async.add_rows(t, doc, _n, _mark)
    bench_snapshot.add_rows(t, doc, _n, _mark)
    if "fairness" in doc:
        from . import bench_fairness

        bench_fairness.add_rows(t, doc, _n, _mark)
    r = doc.get("rebuild")
    if r is None:
        pass
    elif _num(r.get("serial_s")) and _num(r.get("batched_s")):
        t.add_row(f"rebuild {r['answers']:,} answers: 1 job / {r['batch']}-id jobs (median of {r['rounds']})",
                  f"{r['serial_s']:.2f} s / {r['batched_s']:.2f} s",
                  f"<= 0.6x ({r['ratio']:.2f}x)", _mark(r["ratio"] <= 0.6))
    else:
        t.add_row("counter rebuild", "not measured", "<= 0.6x", "")
    if "peers" in doc:
        if not doc["peers"]:
            t.add_row("peers", "none measured (see the notes)", "", "")
        coroutines = doc.get("drain_async", {})
        for name, peer in doc["peers"].items():
            for p, rate in peer["drain_per_s"].items():
                vs = _ratio(drains.get(p), rate)
                goal, ok = f"dj: {vs:.1f}x" if vs is not None else "", None
                if p == str(coroutines.get("processes")):
                    # The async peers against dj's async drain: the issue asks for 10x oban-py's and pgqueuer's.
                    avs = _ratio(coroutines.get("per_s"), rate)
                    if avs is not None:
                        goal += f"; async jobs: {avs:.1f}x" + (" (>= 10x)" if name in PEERS_10X else "")
                        ok = avs >= 10 if name in PEERS_10X else None
                t.add_row(f"{name} {peer['version']}: drain, {p} proc.", _n(rate), goal, _mark(ok))
            vs = _ratio(bulk, peer["enqueue_bulk_per_s"])
            t.add_row(f"{name} {peer['version']}: bulk enqueue", _n(peer["enqueue_bulk_per_s"]),
                      f"dj: {vs:.1f}x" if vs is not None else "", "")
    for note in doc["notes"]:
        t.add_row("[yellow]note", f"[yellow]{note}", "", "")
    return t


def cli(jobs: int | None, processes: str, peers: bool, quick: bool, as_json: bool, console,
        only: str | None = None) -> None:
    """What `dj bench` does: run with a progress bar on stderr, print the table or the JSON."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

    counts = parse_processes(processes)
    sections = None if only is None else [part.strip() for part in only.split(",") if part.strip()]
    _sections(sections)  # a bad --only is one error line, before the progress bar draws anything
    bar = Bar(TextColumn("{task.description:<60}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
              console=Console(stderr=True), transient=True)
    with ExitStack() as stack:
        stack.enter_context(bar)
        task = bar.add_task("dj bench", total=None)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        doc = run_bench(jobs=jobs, processes=counts, peers=peers, quick=quick, progress=progress,
                        only=sections)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        console.print(table(doc))
