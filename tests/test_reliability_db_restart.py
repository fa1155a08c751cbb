"""PostgreSQL restarts in the middle of thousands of jobs: the workers survive, reconnect with
backoff, log one line per outage, and every job ends up done. The server is a throwaway one in a
temporary DJ_HOME (never the suite's server), and it asks for a password, so that the test can also
show that the password never reaches a log or an error."""

import os
import re
import signal
import subprocess
import sys

import psycopg
import pytest

import dj
from dj.chaos import ThrowawayServer, read_runs, work
from dj.worker import reconnect_delay
from tests.conftest import ROOT, wait_for

PASSWORD = "Hunter2-not-in-logs"


@pytest.fixture(scope="module")
def server():
    s = ThrowawayServer(prefix="dj-restart-test-")
    try:
        with psycopg.connect(s.url, autocommit=True) as conn:
            conn.execute(f"ALTER USER postgres PASSWORD '{PASSWORD}'")
            hba = conn.execute("SHOW hba_file").fetchone()[0]
            lines = open(hba).read().splitlines()
            open(hba, "w").write("\n".join(re.sub(r"\btrust\b", "scram-sha-256", line)
                                           if not line.lstrip().startswith("#") else line for line in lines) + "\n")
            conn.execute("SELECT pg_reload_conf()")
        s.url = s.url.replace("postgres:@", f"postgres:{PASSWORD}@")
        dj.migrate(s.url)
        yield s
    finally:
        s.destroy()


class Workers(subprocess.Popen):
    """`dj work` on the throwaway server, its log collected in a file."""

    def __init__(self, url, log_path, *args):
        self.log_path = log_path
        with open(log_path, "w") as log:
            super().__init__([sys.executable, "-m", "dj", "work", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=log, env={**os.environ, "DJ_DATABASE_URL": url, "DJ_TASKS": "dj.chaos",
                                              "DJ_CHAOS_DIR": str(os.path.dirname(log_path))})

    def log(self):
        return open(self.log_path).read()


@pytest.mark.no_database
def test_reconnect_backoff_is_exponential_and_capped():
    for failures, base in [(0, 0.5), (1, 1), (2, 2), (3, 4), (6, 30), (50, 30), (10**6, 30)]:
        delays = [reconnect_delay(failures) for _ in range(100)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)


def test_workers_survive_a_restart_log_one_line_per_outage_and_every_job_is_done(server, tmp_path):
    with psycopg.connect(server.url) as conn:
        ids = work.using(conn=conn).enqueue_many([{"ms": 10}] * 4000)
    workers = Workers(server.url, str(tmp_path / "workers.log"), "--processes", "2", "--concurrency", "8",
                      "--lock-timeout", "5")
    try:
        def left():
            try:
                with psycopg.connect(server.url, autocommit=True, connect_timeout=5) as c:
                    return c.execute("SELECT count(*) FROM jobs").fetchone()[0]
            except psycopg.OperationalError:
                return None

        wait_for(lambda: (left() or len(ids)) < 0.8 * len(ids), timeout=60, message="a fifth of the jobs to be done")
        server.stop()
        pids = wait_for(lambda: set(re.findall(r"dj\.worker\[(\d+)\]: worker \S+ started", workers.log())),
                        message="the worker processes' pids")
        assert len(pids) == 2
        wait_for(lambda: all(f"[{p}]: database connection lost" in workers.log() for p in pids), timeout=30,
                 message="both workers to notice the outage")
        assert left() is None
        server.start()
        wait_for(lambda: left() == 0, timeout=90, message="every job to be done")
        workers.send_signal(signal.SIGTERM)
        assert workers.wait(60) == 0
    finally:
        if workers.poll() is None:
            workers.kill()
            workers.wait()

    log = workers.log()
    for pid in pids:
        assert len(re.findall(rf"\[{pid}\]: database connection lost", log)) == 1, log
        assert len(re.findall(rf"\[{pid}\]: database connection restored after", log)) == 1, log
    assert "Traceback" not in log and "starting a replacement" not in log, log
    noisy = [line for line in log.splitlines() if (" WARNING " in line or " ERROR " in line)
             and "database connection lost" not in line]
    assert not noisy, "one line per outage and nothing else"
    assert PASSWORD not in log
    runs = read_runs(tmp_path)
    assert set(ids) <= {job_id for job_id, rs in runs.items() if any(r.finished for r in rs)}, \
        "every job ran to its end at least once"


def test_a_wrong_password_is_never_shown(server):
    wrong = "Wrong-pw-42-never-shown"
    url = server.url.replace(PASSWORD, wrong)
    result = subprocess.run([sys.executable, "-m", "dj", "work", "--burst", "--database-url", url], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "DJ_TASKS": "dj.chaos"})
    assert result.returncode == 2
    assert "password authentication failed" in result.stderr
    assert wrong not in result.stderr + result.stdout and PASSWORD not in result.stderr
    assert "postgres:***@" in result.stderr
