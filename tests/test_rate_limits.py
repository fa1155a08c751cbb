"""Rate limits: no window of the limit's length sees more claims than the limit, across worker
processes, after a kill -9, and per task; held jobs stay ready in their place; `off`; `--burst`;
the CLI. Every job records its claim time (its row's locked_at, the start a limit counts: see
dj/rates.py) and the tests check every window."""

import json
import os
import signal
import time
from datetime import datetime, timedelta

import pytest

from dj import admin, rates
from dj.task import job
from tests.conftest import wait_for
from tests.support_rates import claim, rated


def claim_times(conn, marker_like: str = "%") -> list[datetime]:
    return [r[0] for r in conn.execute(
        "SELECT at FROM test_runs WHERE marker LIKE %s ORDER BY at", (marker_like,)).fetchall()]


def busiest_window(times: list[datetime], period: float) -> int:
    """The most times in any window [t, t + period). A window holds no more than the one that
    starts at its first time, so checking the windows that start at each time checks them all."""
    span = timedelta(seconds=period)
    best, j = 0, 0
    for i, start in enumerate(times):
        j = max(j, i)
        while j < len(times) and times[j] < start + span:
            j += 1
        best = max(best, j - i)
    return best


def jobs_left(conn) -> int:
    return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def four_workers(conn, worker_process, *args: str):
    workers = [worker_process("--concurrency", "4", *args) for _ in range(4)]
    wait_for(lambda: conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 4, message="4 workers")
    return workers


# --- the helpers themselves -------------------------------------------------------------------------

@pytest.mark.no_database
def test_busiest_window_checks_every_window():
    t0 = datetime(2026, 1, 1)
    at = [t0 + timedelta(seconds=s) for s in (0, 0.5, 1.0, 1.2, 2.19, 2.2)]
    assert busiest_window(at, 1.0) == 3  # [0.5, 1.5) holds 0.5, 1.0 and 1.2
    assert busiest_window(at, 0.01) == 1
    assert busiest_window(at, 10) == 6


@pytest.mark.no_database
def test_specs():
    assert rates.parse("100/min") == rates.Rate(100, 60.0)
    assert rates.parse("10/s") == rates.Rate(10, 1.0)
    assert rates.parse(" 5 / H ") == rates.Rate(5, 3600.0)
    assert str(rates.parse("7/minute")) == "7/min"
    for bad in ("5/x", "0/s", "abc", "10", "-1/s", "1.5/s", "/s", ""):
        with pytest.raises(ValueError, match="bad rate"):
            rates.parse(bad)
    with pytest.raises(ValueError, match="bad rate"):
        job(name="test.rate.bad", rate="fast")(lambda: None)


# --- a queue's rate ---------------------------------------------------------------------------------

def test_a_queue_rate_holds_in_every_window_across_four_worker_processes(conn, cli, worker_process):
    assert cli("queue", "rate", "default", "20/s").returncode == 0
    claim.enqueue_many([(f"j{i}",) for i in range(120)])
    four_workers(conn, worker_process)
    wait_for(lambda: jobs_left(conn) == 0, timeout=60, message="all jobs to finish")
    times = claim_times(conn)
    assert len(times) == 120
    assert busiest_window(times, 1.0) == 20, "at most the limit in any 1 s window, and the limit used"
    # Set-based: a claim takes what the window allows in one round trip, so far fewer claims
    # (distinct claim times) than jobs.
    assert len(set(times)) <= 40
    assert conn.execute("SELECT count(DISTINCT pid) FROM test_runs").fetchone()[0] >= 2
    assert (times[-1] - times[0]).total_seconds() >= 5.0  # 120 jobs at 20/s: six windows


def test_the_rate_holds_after_a_worker_is_killed_with_sigkill(conn, cli, worker_process):
    assert cli("queue", "rate", "default", "10/s").returncode == 0
    claim.enqueue_many([(f"j{i}", 1.0) for i in range(60)])
    workers = four_workers(conn, worker_process, "--lock-timeout", "2")
    victim = workers[0]
    # Kill it while it holds claimed jobs, so they are reaped and claimed again: new starts.
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs j JOIN workers w ON j.locked_by = w.name"
                                  " WHERE w.pid = %s", (victim.pid,)).fetchone()[0] > 0,
             message="the victim to hold jobs")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    wait_for(lambda: jobs_left(conn) == 0, timeout=90, message="all jobs to finish")
    assert conn.execute("SELECT count(*) FROM test_runs WHERE attempt > 1").fetchone()[0] >= 1, \
        "a job of the killed worker ran again"
    times = claim_times(conn)
    assert len(times) >= 60  # a job the victim had claimed but not started records only its second claim
    assert busiest_window(times, 1.0) <= 10


# --- a task's rate ----------------------------------------------------------------------------------

def test_a_task_rate_holds_and_does_not_hold_back_the_queue(conn, worker_process):
    rated.enqueue_many([(f"rated{i}",) for i in range(30)])  # 5/s (tests/support_rates.py)
    claim.enqueue_many([(f"free{i}",) for i in range(30)])  # behind them in the same queue
    four_workers(conn, worker_process)
    wait_for(lambda: jobs_left(conn) == 0, timeout=60, message="all jobs to finish")
    held, free = claim_times(conn, "rated%"), claim_times(conn, "free%")
    assert len(held) == 30 and len(free) == 30
    assert busiest_window(held, 1.0) == 5
    assert (held[-1] - held[0]).total_seconds() >= 5.0
    # The other task's jobs did not wait behind the held ones (30 at 5/s take 6 s).
    assert (free[-1] - held[0]).total_seconds() < 3.0
    # Held jobs kept their order: each window took the oldest of them.
    order = [int(r[0][5:]) for r in conn.execute(
        "SELECT marker FROM test_runs WHERE marker LIKE 'rated%%' ORDER BY at, job_id").fetchall()]
    assert order == sorted(order)


# --- held jobs, off, status -------------------------------------------------------------------------

def test_held_jobs_stay_ready_in_order_until_the_rate_is_turned_off(conn, cli, worker_process):
    assert cli("queue", "rate", "default", "2/h").returncode == 0
    ids = claim.enqueue_many([(f"j{i}",) for i in range(6)])
    worker_process("--concurrency", "4")
    wait_for(lambda: len(claim_times(conn)) == 2, message="two jobs to run")
    time.sleep(1.0)
    assert len(claim_times(conn)) == 2
    ran = [r[0] for r in conn.execute("SELECT job_id FROM test_runs ORDER BY job_id")]
    assert ran == ids[:2], "the first two in claim order"
    ready = [j["id"] for j in admin.list_jobs(conn, state="ready")]
    assert ready == ids[2:], "held jobs stay ready"

    status = json.loads(cli("status", "--json").stdout)
    assert {"scope": "queue", "name": "default", "rate": "2/h", "limit": 2, "period_s": 3600.0,
            "used": 2} in status["rate_limits"]
    assert "rate limit of queue default: 2/h, 2 used" in cli("status").stdout

    result = cli("queue", "rate", "default", "off")
    assert result.returncode == 0 and "no rate limit" in result.stdout
    wait_for(lambda: jobs_left(conn) == 0, timeout=10, message="the held jobs to run once the limit is off")
    order = [r[0] for r in conn.execute("SELECT job_id FROM test_runs ORDER BY at, job_id")]
    assert order == ids
    assert json.loads(cli("status", "--json").stdout)["rate_limits"] == []


# --- --burst ----------------------------------------------------------------------------------------

def commits(conn) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def test_burst_waits_for_rate_held_jobs_without_spinning(conn, cli, run_burst):
    assert cli("queue", "rate", "default", "10/s").returncode == 0
    claim.enqueue_many([(f"j{i}",) for i in range(45)])
    before = commits(conn)
    started = time.monotonic()
    run_burst(processes=2)
    elapsed = time.monotonic() - started
    assert jobs_left(conn) == 0, "--burst exits only once the rate-held jobs have run"
    times = claim_times(conn)
    assert len(times) == 45 and busiest_window(times, 1.0) <= 10
    assert elapsed >= 4.0
    # Asleep until each window frees a slot, not polling: a handful of transactions per window
    # per process (claims, heartbeats, registration), where a busy loop makes thousands.
    time.sleep(0.6)  # statistics reach pg_stat_database within half a second
    assert commits(conn) - before < 300


def test_burst_waits_for_a_task_rate(conn, run_burst):
    rated.enqueue_many([(f"rated{i}",) for i in range(12)])
    run_burst(processes=1)
    assert jobs_left(conn) == 0
    times = claim_times(conn)
    assert len(times) == 12 and busiest_window(times, 1.0) <= 5
    assert (times[-1] - times[0]).total_seconds() >= 2.0


# --- the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["5/x", "0/s", "abc", "10", "1.5/s", "5/min/s"])
def test_a_bad_rate_is_one_error_line_and_changes_nothing(conn, cli, spec):
    assert cli("queue", "rate", "default", "30/min").returncode == 0
    result = cli("queue", "rate", "default", spec)
    assert result.returncode == 2
    assert result.stderr.startswith("error: bad rate") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert rates.queue_rates(conn) == {"default": rates.Rate(30, 60.0)}


def test_the_python_api(conn):
    assert rates.set_queue_rate(conn, "mail", "3/s") == rates.Rate(3, 1.0)
    assert rates.queue_rates(conn) == {"mail": rates.Rate(3, 1.0)}
    assert rates.set_queue_rate(conn, "mail", None) is None
    assert rates.queue_rates(conn) == {}
    assert admin.queue_settings(conn)["mail"] == {"paused": False, "concurrency_limit": None}


# --- the dashboard and /metrics ---------------------------------------------------------------------

def test_the_dashboard_and_metrics_show_rate_limits_and_their_use(conn, cli, run_burst, db_url):
    import re
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    from dj.web import create_app

    assert cli("queue", "rate", "default", "5/min").returncode == 0
    claim.enqueue_many([(f"j{i}",) for i in range(3)])
    rated.enqueue_many([(f"rated{i}",) for i in range(2)])
    run_burst(processes=1)
    assert jobs_left(conn) == 0
    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        page = client.get("/", headers={"Accept": "text/html"}).text
        row = re.search(r'<tr data-queue="default">(.*?)</tr>', page, re.S).group(1)
        # The queue's window holds all 5 claims of the queue: 3 of test.rate.claim, 2 of test.rate.task.
        assert 'data-rate="5/min"' in row and "5/min · 5 used" in row
        assert re.search(r'<tr data-task-rate="test.rate.task"><td>test.rate.task</td><td>5/s</td>', page)
        text = client.get("/metrics").text
    assert 'dj_rate_limit{name="default",scope="queue"} 5.0' in text
    assert 'dj_rate_limit_period_seconds{name="default",scope="queue"} 60.0' in text
    assert 'dj_rate_limit_used{name="default",scope="queue"} 5.0' in text
    assert 'dj_rate_limit{name="test.rate.task",scope="task"} 5.0' in text
