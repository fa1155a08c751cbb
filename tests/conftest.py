"""Shared fixtures. Every test talks to a real PostgreSQL server:
DJ_DATABASE_URL if it is set, otherwise dj's embedded server. The session gets a database of its
own on that server, and each test starts with empty tables."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Before dj is imported: subprocesses (workers, the CLI) inherit all of this.
os.environ.setdefault("DJ_HOME", str(Path(tempfile.gettempdir()) / "dj-test-home"))
os.environ["DJ_TASKS"] = "tests.support_jobs,tests.support_async,tests.support_rates"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from dj import db  # noqa: E402
from dj.errors import DatabaseUnavailable  # noqa: E402
from dj.pytest_plugin import empty_tables  # noqa: E402
from tests.support_jobs import RUNS_DDL  # noqa: E402


def pytest_configure(config):
    # dj's plugin comes from its pytest11 entry point; a venv installed before the entry point
    # existed lacks it until `pip install -e .` runs again, and these tests need its fixtures.
    if not config.pluginmanager.has_plugin("dj") and not config.pluginmanager.is_blocked("dj"):
        import dj.pytest_plugin

        config.pluginmanager.register(dj.pytest_plugin, "dj")


@pytest.fixture(scope="session")
def db_url(dj_database_url):
    """The session's database (dj's pytest plugin creates, migrates and drops it), with the table
    the support jobs write to."""
    with psycopg.connect(dj_database_url, autocommit=True) as conn:
        conn.execute(RUNS_DDL)
    return dj_database_url


@pytest.fixture(scope="session")
def pgbouncer(db_url):
    """A real PgBouncer (Debian's package) in transaction mode in front of the test server, with a
    pool of 2 server connections: fewer than the worker processes the tests run through it.
    `pgbouncer.url()` is the session database through it."""
    from dj.bench_pooler import PgBouncer, Unavailable

    try:
        bouncer = PgBouncer(db_url, mode="transaction", pool_size=2)
    except Unavailable as exc:
        pytest.skip(f"no PgBouncer: {exc}")
    yield bouncer
    bouncer.stop()


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def unreachable_database(monkeypatch):
    """dj pointed at an address where nothing listens: a test that passes with it reached no
    database, so it wrote nothing (what enqueue's checks promise) and needed none."""
    nowhere = "postgresql://nobody@127.0.0.1:1/nothing"
    monkeypatch.setenv("DJ_DATABASE_URL", nowhere)
    monkeypatch.setattr(db, "_override", None)
    monkeypatch.setattr(db, "_pools", {})
    with pytest.raises(DatabaseUnavailable):
        db.pool()
    return nowhere


# Fixtures of tests that need no database (dj's test mode, or none at all): such a test gets none.
NO_DATABASE_FIXTURES = {"dj_jobs", "dj_inline", "unreachable_database"}


def needs_no_database(request) -> bool:
    """A test that asks for a fixture above, or is marked no_database, and for no database fixture."""
    quiet = NO_DATABASE_FIXTURES & set(request.fixturenames) or request.node.get_closest_marker("no_database")
    return bool(quiet) and "db_url" not in request.fixturenames


@pytest.fixture(autouse=True)
def clean_db(request):
    """Empty every table before each test, so no test sees another's rows (tests that need no
    database get none: not even the session's is created for them)."""
    if needs_no_database(request):
        yield
        return
    empty_tables(request.getfixturevalue("db_url"))
    yield


def dj_cli(*args: str, env: dict | None = None, timeout: float = 120, input: str | None = None):
    """Run the real `dj` command in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "dj", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input, cwd=ROOT)


@pytest.fixture
def cli(db_url):
    return dj_cli


class WorkerProcess(subprocess.Popen):
    """`dj work ARGS` as a real background process; its log (stderr) is collected as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        super().__init__([sys.executable, "-m", "dj", "work", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=ROOT)
        self.log_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.stderr:
            self.log_lines.append(line)

    def log(self) -> str:
        return "".join(self.log_lines)

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        wait_for(lambda: text in self.log(), timeout=timeout, message=f"worker log line {text!r}")


def start_worker(*args: str, env: dict | None = None) -> WorkerProcess:
    return WorkerProcess(*args, env=env)


@pytest.fixture
def worker_process(db_url):
    started: list[WorkerProcess] = []

    def start(*args: str, env: dict | None = None) -> WorkerProcess:
        p = start_worker(*args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.fixture
def run_burst(cli):
    """Drain queues with real worker processes (`dj work --burst`); returns the CompletedProcess.
    Through the `cli` fixture, so a module that overrides it (test_pgbouncer) drains its way."""

    def run(queues=("default",), processes: int = 1, concurrency: int = 4, *extra: str, timeout: float = 300):
        result = cli("work", "--burst", "--queues", ",".join(queues), "--processes", str(processes),
                     "--concurrency", str(concurrency), *extra, timeout=timeout)
        assert result.returncode == 0, result.stderr
        return result

    return run


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    """Poll until predicate() is truthy; fail the test with `message` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)
