"""`dj bench --peers`: the same drains and bulk enqueue, measured for other PostgreSQL queues.

Each peer is installed in the bench's scratch database and run with its own defaults, from its
own worker processes (multiprocessing, spawn), timed the way dj's drains are: from the commit of
a bulk enqueue to the moment none of the queue's jobs is pending.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import conninfo

from . import db
from .errors import DJError

PEERS = ("procrastinate", "pgqueuer", "oban")
QUICK_PEER_JOBS = 1_000
# oban-py (PyPI `oban`) needs Python 3.12; on an older interpreter it is skipped with a note.
OBAN_PYTHON = (3, 12)


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.inf


def log_tail(path: str, lines: int = 5) -> str:
    """The last lines of a worker's log file, on one line: for the error of a failed run."""
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""

def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "unknown"


def _quiet_child(log_path: str) -> None:
    """A peer worker process writes its logs to a file, not over the bench's progress display."""
    import logging

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


class _PeerWorkers:
    """P peer worker processes (multiprocessing, spawn), each reporting when it is about to work."""

    def __init__(self, target: Callable[..., None], args: tuple, processes: int):
        self.ctx = multiprocessing.get_context("spawn")
        self.log = tempfile.NamedTemporaryFile(prefix="dj-bench-peer-", suffix=".log", delete=False)
        self.log.close()
        self.events = [self.ctx.Event() for _ in range(processes)]
        self.children = [self.ctx.Process(target=target, args=(*args, e, self.log.name), daemon=True)
                         for e in self.events]

    def __enter__(self) -> "_PeerWorkers":
        try:
            for child in self.children:
                child.start()
            deadline = time.monotonic() + 120
            for event in self.events:
                while not event.wait(0.1):
                    self.check()
                    if time.monotonic() > deadline:
                        raise DJError("peer workers did not start within 120 s")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def check(self) -> None:
        for child in self.children:
            if child.exitcode is not None:
                raise DJError(f"a peer worker exited with code {child.exitcode}: {log_tail(self.log.name)}")

    def __exit__(self, *exc: Any) -> None:
        for child in self.children:
            if child.is_alive():
                child.terminate()
        for child in self.children:
            child.join(15)
            if child.is_alive():
                child.kill()
                child.join(5)
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


class _Peer:
    """One peer system on the scratch database: install, bulk-enqueue, drain with P processes."""

    name = ""
    worker: Callable[..., None]

    def __init__(self, url: str, queue: str, bench: Any):  # a dj.bench._Bench
        self.url = url
        self.queue = queue
        self.bench = bench

    def setup(self) -> None:
        raise NotImplementedError

    def enqueue(self, n: int) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    pending_sql = ""

    def bulk(self, n: int) -> float:
        self.enqueue(10)  # warm-up
        self.clear()
        t = time.perf_counter()
        self.enqueue(n)
        rate = _rate(n, time.perf_counter() - t)
        self.clear()
        return rate

    def drain(self, n: int, processes: int) -> float:
        with _PeerWorkers(type(self).worker, (self.url, self.queue), processes) as workers, \
                db.connect(self.url, autocommit=True) as conn:
            saved, self.bench.conn = self.bench.conn, conn
            try:
                self.enqueue(min(n, 20))  # warm-up: every worker loop running and listening
                self.bench.wait_empty(workers, self.queue, 20, self.pending_sql)
                time.sleep(0.3)
                self.enqueue(n)
                t0 = time.perf_counter()
                t1 = self.bench.wait_empty(workers, self.queue, n, self.pending_sql)
            finally:
                self.bench.conn = saved
        return _rate(n, t1 - t0)


def _procrastinate_app(url: str, queue: str):
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="dj_bench_noop", queue=queue)
    def noop_task() -> None:
        pass

    return app, noop_task


def _procrastinate_worker(url: str, queue: str, ready, log_path: str) -> None:
    _quiet_child(log_path)
    app, _ = _procrastinate_app(url, queue)

    async def main() -> None:
        async with app.open_async():
            ready.set()
            await app.run_worker_async(queues=[queue])  # its defaults: concurrency 1, LISTEN/NOTIFY

    asyncio.run(main())


class _Procrastinate(_Peer):
    name = "procrastinate"
    worker = staticmethod(_procrastinate_worker)
    pending_sql = ("SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE queue_name = %(q)s"
                   " AND status IN ('todo', 'doing'))")

    def setup(self) -> None:
        app, _ = _procrastinate_app(self.url, self.queue)

        async def install() -> None:
            async with app.open_async():
                await app.schema_manager.apply_schema_async()

        asyncio.run(install())

    def bulk(self, n: int) -> float:
        """Timed inside the event loop, around `batch_defer_async` alone."""
        app, task = _procrastinate_app(self.url, self.queue)

        async def run() -> float:
            async with app.open_async():
                await task.batch_defer_async(*([{}] * 10))
                self.clear()
                t = time.perf_counter()
                await task.batch_defer_async(*([{}] * n))
                elapsed = time.perf_counter() - t
            self.clear()
            return _rate(n, elapsed)

        return asyncio.run(run())

    def enqueue(self, n: int) -> None:
        app, task = _procrastinate_app(self.url, self.queue)

        async def defer() -> None:
            async with app.open_async():
                await task.batch_defer_async(*([{}] * n))

        asyncio.run(defer())

    def clear(self) -> None:
        with db.connect(self.url, autocommit=True) as conn:
            conn.execute("DELETE FROM procrastinate_jobs WHERE queue_name = %s AND status = 'todo'", (self.queue,))


def _pgqueuer_driver_name() -> str:
    """pgqueuer's own default (its `pgq` command): asyncpg when installed, else psycopg."""
    try:
        import asyncpg  # noqa: F401

        return "asyncpg"
    except ImportError:
        return "psycopg"


async def _pgqueuer_driver(url: str):
    """A pgqueuer driver and a coroutine function that closes its connection."""
    if _pgqueuer_driver_name() == "asyncpg":
        import asyncpg
        from pgqueuer import AsyncpgDriver

        params = conninfo.conninfo_to_dict(url)
        conn = await asyncpg.connect(host=params.get("host"), port=params.get("port"), user=params.get("user"),
                                     password=params.get("password") or None, database=params.get("dbname"))
        return AsyncpgDriver(conn), conn.close
    from pgqueuer import PsycopgDriver

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    return PsycopgDriver(conn), conn.close


def _pgqueuer_run(coro) -> Any:
    """pgqueuer's `pgq` runs its loop on uvloop when it is installed; so do we."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _pgqueuer_worker(url: str, entrypoint: str, ready, log_path: str) -> None:
    _quiet_child(log_path)
    from pgqueuer import PgQueuer

    async def main() -> None:
        driver, close = await _pgqueuer_driver(url)
        pgq = PgQueuer(driver)

        @pgq.entrypoint(entrypoint)
        async def noop_entry(job) -> None:
            pass

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, pgq.shutdown.set)
        ready.set()
        try:
            await pgq.run()  # its defaults: batch_size 10, continuous mode, LISTEN/NOTIFY
        finally:
            await close()

    _pgqueuer_run(main())


class _PgQueuer(_Peer):
    name = "pgqueuer"
    worker = staticmethod(_pgqueuer_worker)
    pending_sql = "SELECT EXISTS (SELECT 1 FROM pgqueuer WHERE entrypoint = %(q)s)"

    def _with_queries(self, work: Callable[[Any], Any]) -> Any:
        from pgqueuer import Queries

        async def run() -> Any:
            driver, close = await _pgqueuer_driver(self.url)
            try:
                return await work(Queries(driver))
            finally:
                await close()

        return _pgqueuer_run(run())

    def setup(self) -> None:
        self._with_queries(lambda queries: queries.install())

    def bulk(self, n: int) -> float:
        """Timed inside the event loop, around `Queries.enqueue` alone."""

        async def work(queries) -> float:
            await queries.enqueue([self.queue] * 10, [None] * 10, [0] * 10)
            await queries.clear_queue(self.queue)
            t = time.perf_counter()
            await queries.enqueue([self.queue] * n, [None] * n, [0] * n)
            elapsed = time.perf_counter() - t
            await queries.clear_queue(self.queue)
            return _rate(n, elapsed)

        return self._with_queries(work)

    def enqueue(self, n: int) -> None:
        self._with_queries(lambda queries: queries.enqueue([self.queue] * n, [None] * n, [0] * n))

    def clear(self) -> None:
        with db.connect(self.url, autocommit=True) as conn:
            conn.execute("DELETE FROM pgqueuer WHERE entrypoint = %s", (self.queue,))




# oban-py: a worker class registered under the same name in every process, so that the workers
# find the class the enqueuer named. The queue is given per job (`new(queue=...)`), since the
# bench's queue names are new each run.
_OBAN_WORKER: Any = None


def _oban_job() -> Any:
    global _OBAN_WORKER
    if _OBAN_WORKER is None:
        import oban

        @oban.worker(queue="default")
        class DjBenchNoop:
            async def process(self, job: Any) -> None:
                pass

        _OBAN_WORKER = DjBenchNoop
    return _OBAN_WORKER


async def _oban_pool(url: str, size: int = 10) -> Any:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=1, max_size=size, open=False)
    await pool.open(wait=True)
    return pool


# What oban-py's README starts a queue with; it has no default limit of its own.
OBAN_QUEUE_LIMIT = 10


def _oban_worker(url: str, queue: str, ready, log_path: str) -> None:
    _quiet_child(log_path)
    from oban import Oban

    _oban_job()

    async def main() -> None:
        pool = await _oban_pool(url)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            async with Oban(pool=pool, queues={queue: OBAN_QUEUE_LIMIT}):
                ready.set()
                await stop.wait()
        finally:
            await pool.close()

    asyncio.run(main())


class _Oban(_Peer):
    name = "oban"
    worker = staticmethod(_oban_worker)
    pending_sql = ("SELECT EXISTS (SELECT 1 FROM oban_jobs WHERE queue = %(q)s"
                   " AND state IN ('available', 'scheduled', 'executing', 'retryable'))")

    def setup(self) -> None:
        from oban.schema import install_sql

        with db.connect(self.url, autocommit=True) as conn:
            if not conn.execute("SELECT to_regclass('oban_jobs') IS NOT NULL").fetchone()[0]:
                conn.execute(install_sql())

    def _with_oban(self, work: Callable[[Any], Any]) -> Any:
        from oban import Oban

        async def run() -> Any:
            pool = await _oban_pool(self.url, 2)
            try:
                async with Oban(pool=pool) as client:  # client mode: no queues, enqueues only
                    return await work(client)
            finally:
                await pool.close()

        return asyncio.run(run())

    def _jobs(self, n: int) -> list[Any]:
        noop = _oban_job()
        return [noop.new({}, queue=self.queue) for _ in range(n)]

    def bulk(self, n: int) -> float:
        """Timed inside the event loop, around `enqueue_many` alone."""

        async def work(client: Any) -> float:
            await client.enqueue_many(self._jobs(10))
            self.clear()
            jobs = self._jobs(n)
            t = time.perf_counter()
            await client.enqueue_many(jobs)
            elapsed = time.perf_counter() - t
            self.clear()
            return _rate(n, elapsed)

        return self._with_oban(work)

    def enqueue(self, n: int) -> None:
        self._with_oban(lambda client: client.enqueue_many(self._jobs(n)))

    def clear(self) -> None:
        with db.connect(self.url, autocommit=True) as conn:
            conn.execute("DELETE FROM oban_jobs WHERE queue = %s", (self.queue,))

_PEER_CLASSES = {"procrastinate": _Procrastinate, "pgqueuer": _PgQueuer, "oban": _Oban}


def measure(bench: Any) -> dict[str, Any]:
    """The peers' bulk enqueue and drains on a scratch database of `bench` (a dj.bench._Bench)."""
    found = {}
    for name in PEERS:
        if name == "oban" and sys.version_info < OBAN_PYTHON:
            continue  # noted below
        try:
            __import__(name)
            found[name] = True
        except ImportError:
            pass
    if not found:
        bench.notes.append("peers: none of procrastinate, pgqueuer, oban is installed (pip install 'djq[bench]')")
        return {}
    try:
        url = bench.scratch()
    except psycopg.errors.InsufficientPrivilege:
        bench.notes.append("peers: not measured, the database user may not CREATE DATABASE")
        return {}
    n = min(bench.jobs, QUICK_PEER_JOBS) if bench.quick else bench.jobs
    results: dict[str, Any] = {}
    for name in PEERS:
        if name == "oban" and sys.version_info < OBAN_PYTHON:
            bench.notes.append(f"peers: oban-py needs Python {'.'.join(map(str, OBAN_PYTHON))} or newer; "
                               f"this is {platform.python_version()}: run dj bench --peers under a newer Python for it")
            continue
        if name not in found:
            bench.notes.append(f"peers: {name} is not installed")
            continue
        peer = _PEER_CLASSES[name](url, bench.queue(name), bench)
        bench.steps.start(f"{name}: bulk enqueue of {n:,} jobs")
        try:
            peer.setup()
            bulk = peer.bulk(n)
            drains = {}
            for p in bench.processes:
                bench.steps.start(f"{name}: drain {n:,} jobs with {p} process{'es' if p > 1 else ''}")
                drains[str(p)] = peer.drain(n, p)
        except Exception as exc:  # noqa: BLE001 - a peer's failure must not lose dj's figures
            bench.notes.append(f"peers: {name} failed: {type(exc).__name__}: {str(exc).strip()[:200]}")
            continue
        results[name] = {"version": _version(name), "jobs": n, "drain_per_s": drains,
                         "enqueue_bulk_per_s": bulk}
        if name == "pgqueuer":
            results[name]["driver"] = _pgqueuer_driver_name()
    return results
