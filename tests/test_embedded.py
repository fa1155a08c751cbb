"""The embedded server (`dj db start|stop|url`), each test in a DJ_HOME of its own.

DJ_DATABASE_URL is set to '' for these subprocesses, which dj treats as unset: they use the
embedded server, not the session's test database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, dj_cli, wait_for


def new_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="dj-embedded-", dir="/tmp"))
    home.chmod(0o755)  # as root the server runs as its own user, which must reach the data directory
    return home


def env_for(home: Path) -> dict:
    return {"DJ_HOME": str(home), "DJ_DATABASE_URL": ""}


def pidfile_pid(home: Path) -> int | None:
    try:
        return int((home / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie nobody has reaped yet is gone for our purposes


def postmasters(home: Path) -> list[int]:
    """Live postmasters on this home's data directory (their children rename themselves)."""
    pgdata = str(home / "pgdata")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if args and args[0].endswith("/postgres") and "-D" in args and pgdata in args and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def shut_down(home: Path) -> None:
    """Stop this home's server, whatever state a failed test left it in, and remove the home."""
    from dj import embedded

    saved = os.environ.get("DJ_HOME")
    os.environ["DJ_HOME"] = str(home)  # in-process `dj db stop`: no second of interpreter start-up
    try:
        embedded.stop()
    finally:
        if saved is None:
            del os.environ["DJ_HOME"]
        else:
            os.environ["DJ_HOME"] = saved
        for pid in postmasters(home):  # only servers on this temporary home, which this test started
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not postmasters(home), timeout=30, message="the embedded server to exit")
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def home():
    path = new_home()
    yield path
    shut_down(path)


@pytest.fixture
def fresh_home():
    path = new_home()
    yield path
    shut_down(path)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def test_url_starts_the_server_reuses_it_and_stop_stops_it(home):
    env = env_for(home)
    assert pidfile_pid(home) is None

    url = ok(dj_cli("db", "url", env=env)).strip()
    assert url.startswith("postgresql://") and str(home) in url, url
    first = pidfile_pid(home)
    assert first and alive(first)
    with psycopg.connect(url) as c:
        assert c.execute("SELECT current_setting('data_directory')").fetchone()[0] == str(home / "pgdata")
        # Tuned for a job queue's churn (dj/embedded.py); max_connections waits for a restart.
        assert c.execute("SELECT current_setting('autovacuum_naptime'), current_setting('max_wal_size')"
                         ).fetchone() == ("1s", "2GB")

    assert ok(dj_cli("db", "url", env=env)).strip() == url
    assert pidfile_pid(home) == first
    assert postmasters(home) == [first]

    assert ok(dj_cli("db", "stop", env=env)).strip() == "stopped"
    wait_for(lambda: not alive(first), timeout=30, message="the postmaster to exit")
    assert pidfile_pid(home) is None and postmasters(home) == []
    assert ok(dj_cli("db", "stop", env=env)).strip() == "not running"

    assert ok(dj_cli("db", "url", env=env)).strip() == url
    again = pidfile_pid(home)
    assert again and again != first and alive(again)
    assert postmasters(home) == [again]
    with psycopg.connect(url) as c:
        assert c.execute("SELECT current_setting('max_connections')").fetchone()[0] == "200"


def test_migrate_enqueue_work_status_on_the_embedded_server(home, conn):
    env = env_for(home)
    url = ok(dj_cli("db", "url", env=env)).strip()
    assert ok(dj_cli("migrate", env=env)).startswith("schema is at ")
    assert "enqueued job 1 (tasks.demo.noop)" in ok(dj_cli("enqueue", "job", "tasks.demo.noop", env=env))
    with psycopg.connect(url) as c:
        assert c.execute("SELECT task FROM jobs").fetchall() == [("tasks.demo.noop",)]
    ok(dj_cli("work", "--burst", env=env))
    doc = json.loads(ok(dj_cli("status", "--json", env=env)))
    assert doc["totals"] == {"ready": 0, "scheduled": 0, "running": 0, "dead": 0, "retrying": 0, "waiting": 0}
    assert doc["throughput"] == {"succeeded_last_minute": 1, "failed_last_minute": 0}
    with psycopg.connect(url) as c:
        assert c.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    # None of it touched the session's test database.
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_two_starts_at_the_same_moment_make_one_server(fresh_home):
    cmd = [sys.executable, "-m", "dj", "db", "start"]
    env = {**os.environ, **env_for(fresh_home)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for _ in range(2)]
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, err
        outputs.append(out.strip())
    assert outputs[0] == outputs[1] and str(fresh_home) in outputs[0], outputs
    pid = pidfile_pid(fresh_home)
    assert pid and postmasters(fresh_home) == [pid]
    with psycopg.connect(outputs[0]) as c:
        assert c.execute("SELECT current_setting('data_directory')").fetchone()[0] == str(fresh_home / "pgdata")
