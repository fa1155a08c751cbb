"""dj behind a real PgBouncer in transaction mode (the `pgbouncer` fixture: a pool of 2 server
connections, fewer than the worker processes), with DJ_DATABASE_URL pointing at it and no other
setting.

The core behaviours are the other modules' own tests, imported here and run again with every dj
connection going through PgBouncer: this module's autouse fixture points DJ_DATABASE_URL (what
worker and CLI subprocesses inherit) and dj's in-process database at it, while the tests' own
`conn` stays direct. The `run_burst`, `worker_process` and `cli` fixtures are wrapped so that every
worker's and command's log is checked for tracebacks and prepared-statement errors.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
from psycopg import conninfo

import dj
from dj import db, pooler
from dj.bench_pooler import PgBouncer, Unavailable
from tests.conftest import ROOT, dj_cli, start_worker, wait_for
from tests.support_jobs import record

# The behaviours, run again through PgBouncer (pytest collects them here as well).
from tests.test_batches import (  # noqa: F401
    test_a_running_job_reports_progress, test_one_callback_when_the_last_two_jobs_finish_at_the_same_moment,
    test_the_callback_sees_successes_and_deaths)
from tests.test_claiming import (  # noqa: F401
    test_four_processes_run_twenty_thousand_jobs_exactly_once, test_jobs_run_by_priority_then_run_at_then_id,
    test_one_worker_on_several_queues_keeps_global_priority_order, test_scheduled_jobs_wait_and_burst_exits_without_them)
from tests.test_cli import (  # noqa: F401
    test_enqueue_work_status_list_retry_cancel, test_missing_schema_says_run_dj_migrate_and_migrate_is_idempotent,
    test_status_json_counts_every_state_per_queue)
from tests.test_cron import test_three_real_workers_enqueue_each_tick_once  # noqa: F401
from tests.test_enqueue_async import (  # noqa: F401
    test_a_batch_counts_jobs_enqueued_async, test_enqueue_async_writes_the_same_row_as_enqueue,
    test_enqueue_many_async_keeps_order_and_uses_copy_for_big_batches, test_unique_jobs_async_return_the_holders_id)
from tests.test_enqueue import (  # noqa: F401
    test_bulk_enqueue_by_copy_keeps_order_options_and_sends_one_notify, test_enqueue_many_is_one_statement_and_keeps_order,
    test_enqueue_writes_one_row_with_the_task_defaults, test_every_enqueue_call_sends_one_notify_with_the_queue)
from tests.test_queue_controls import (  # noqa: F401
    test_a_pause_hands_back_the_jobs_a_worker_had_buffered, test_a_paused_queue_is_not_claimed_until_resumed,
    test_a_queue_limit_holds_across_four_worker_processes, test_pausing_stops_new_claims_within_a_second)
from tests.test_results import (  # noqa: F401
    test_a_dead_job_raises_job_dead_with_its_last_error, test_result_async_waits_on_the_event_loop,
    test_result_waits_for_a_running_worker_and_wakes_on_notify)
from tests.test_retries import (  # noqa: F401
    test_a_failing_job_is_retried_with_backoff_then_dead, test_a_job_that_fails_once_succeeds_on_retry)
from tests.test_shutdown_and_crashes import (  # noqa: F401
    test_jobs_of_a_worker_killed_with_sigkill_run_again_after_the_lock_timeout,
    test_sigterm_finishes_running_jobs_and_hands_back_unstarted_ones,
    test_the_supervisor_replaces_a_child_killed_with_sigkill)
from tests.test_unique_jobs import (  # noqa: F401
    test_a_held_key_returns_the_existing_job, test_eight_concurrent_enqueuers_insert_each_key_once,
    test_enqueue_many_skips_held_keys_and_returns_every_id, test_the_key_is_free_again_once_the_job_succeeds_or_dies)
from tests.test_web import (  # noqa: F401
    test_metrics, test_overview_shows_counts_per_queue_and_paused_or_active, test_pause_and_resume_a_queue)

BAD = re.compile(r"Traceback|prepared statement|_pg3_", re.I)


def assert_clean(log: str, what: str) -> None:
    bad = [line for line in log.splitlines() if BAD.search(line)]
    assert not bad, f"{what} logged {bad[:3]}:\n{log[-3000:]}"


@pytest.fixture(autouse=True)
def through_pgbouncer(pgbouncer, db_url, monkeypatch):
    """dj, in this process and in the subprocesses it starts, goes through PgBouncer."""
    url = pgbouncer.url()
    monkeypatch.setenv("DJ_DATABASE_URL", url)
    monkeypatch.delenv("DJ_LISTEN_URL", raising=False)
    db.use_database(url)
    yield url
    db.use_database(db_url)


@pytest.fixture
def cli(through_pgbouncer):
    def run(*args, **kwargs):
        result = dj_cli(*args, **kwargs)
        assert_clean(result.stderr, f"dj {' '.join(args)}")
        return result

    return run


@pytest.fixture
def worker_process(through_pgbouncer):
    started = []

    def start(*args: str, env: dict | None = None):
        p = start_worker(*args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        time.sleep(0.05)  # the log reader thread takes the last lines
        assert_clean(p.log(), f"worker {p.pid}")


@pytest.fixture
def client(through_pgbouncer):
    from tests.test_web import LOCAL, TestClient, create_app

    with TestClient(create_app(through_pgbouncer), base_url=LOCAL) as c:
        yield c


@pytest.fixture
def empty_db_url(pgbouncer, db_url):
    name = f"dj_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield pgbouncer.url(name)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- what dj finds out by itself ------------------------------------------------------------------

def test_the_probe_tells_a_transaction_pooler_from_a_direct_connection(pgbouncer, db_url):
    through = pooler.probe(pgbouncer.url())
    assert (through.proxied, through.transactions, through.listen) == (True, True, False)
    assert through.mode == "transaction" and through.transaction_pooler and through.refusal() is None
    direct = pooler.probe(db_url)
    assert (direct.mode, direct.listen, direct.transaction_pooler) == ("direct", True, False)


def test_connections_behind_the_pooler_prepare_nothing(pgbouncer, db_url):
    with db.connect(pgbouncer.url(), autocommit=True) as through, db.connect(db_url, autocommit=True) as direct:
        assert through.prepare_threshold is None
        assert direct.prepare_threshold is not None
    # Many clients, each running the same statements more often than psycopg's threshold (5): with
    # prepared statements this failed with DuplicatePreparedStatement "_pg3_0".
    for _ in range(4):
        with db.connect(pgbouncer.url(), autocommit=True) as c:
            for i in range(8):
                c.execute("SELECT %s::int", (i,))
    with db.connection() as c:
        assert c.prepare_threshold is None


# --- refused at start -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def statement_pgbouncer(db_url, pgbouncer):
    try:
        bouncer = PgBouncer(db_url, mode="statement", pool_size=2)
    except Unavailable as exc:
        pytest.skip(f"no PgBouncer in statement mode: {exc}")
    yield bouncer
    bouncer.stop()


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (result.returncode, result.stderr)
    assert "s3cret" not in result.stderr + result.stdout
    return lines[0]


def with_password(url: str) -> str:
    return url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")


def test_a_pooler_in_statement_mode_is_refused(statement_pgbouncer, pgbouncer):
    url = with_password(statement_pgbouncer.url())  # trust: PgBouncer ignores the password
    for args in (("work", "--burst"), ("work", "--burst", "--processes", "2")):
        line = error_line(dj_cli(*args, env={"DJ_DATABASE_URL": url}))
        assert "statement mode" in line and "***" in line, line


def test_an_unreachable_listen_url_is_refused(pgbouncer):
    line = error_line(dj_cli("work", "--burst", env={"DJ_LISTEN_URL": "postgresql://postgres:s3cret@127.0.0.1:1/x"}))
    assert line.startswith("error: DJ_LISTEN_URL: cannot connect to postgresql://postgres:***@127.0.0.1:1/x"), line
    line = error_line(dj_cli("work", "--burst", "--listen-url", "postgresql://postgres:s3cret@127.0.0.1:1/x"))
    assert "DJ_LISTEN_URL" in line and "***" in line, line


def test_a_listen_url_to_another_database_is_refused(pgbouncer, db_url):
    other = with_password(conninfo.make_conninfo(db_url, dbname="postgres"))
    line = error_line(dj_cli("work", "--burst", env={"DJ_LISTEN_URL": other}))
    assert "points at another database" in line and "database postgres" in line, line


def test_a_listen_url_through_the_transaction_pooler_is_refused(pgbouncer):
    line = error_line(dj_cli("work", "--burst", env={"DJ_LISTEN_URL": with_password(pgbouncer.url())}))
    assert "did not hear a NOTIFY" in line and "direct connection" in line, line


# --- wake-up --------------------------------------------------------------------------------------

def ran(conn):
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs ORDER BY at")]


def test_with_a_listen_url_an_idle_worker_is_woken_by_notify(conn, worker_process, db_url):
    # A poll interval far longer than the wait below: only the NOTIFY can wake it in time.
    w = worker_process("--poll-interval", "60", env={"DJ_LISTEN_URL": db_url})
    w.wait_for_log("started")
    time.sleep(0.5)  # the listener connects just after the worker registers
    for i in range(3):
        record.enqueue(f"n{i}")
        wait_for(lambda: f"n{i}" in ran(conn), timeout=20, message=f"job n{i} to be picked up by NOTIFY")
    assert "LISTEN" in w.log()


def test_without_a_listen_url_idle_workers_poll_the_claim_index(conn, worker_process):
    w = worker_process("--processes", "2", "--poll-interval", "0.2")
    wait_for(lambda: conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 2, message="two workers")
    for i in range(3):
        record.enqueue(f"p{i}")
        wait_for(lambda: f"p{i}" in ran(conn), timeout=20, message=f"job p{i} to be found by polling")
    w.wait_for_log("polls every 0.2s")
    # The workers poll with the probe, not the claim: their backends ran it (pg_stat_statements
    # is not there to ask, so the worker's log says it).


def test_dj_web_serves_through_the_pooler(pgbouncer, conn):
    record.enqueue("w")
    proc = subprocess.Popen([sys.executable, "-m", "dj", "web", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy())
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
        import httpx

        for _ in range(8):  # more often than psycopg's prepare threshold
            for path in ("/", "/jobs", "/metrics"):
                r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
                assert r.status_code == 200, (path, r.text[:500])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert_clean(err, "dj web")


def test_async_enqueues_through_a_transaction_pooler_prepare_nothing(conn):
    """dj's async pool turns psycopg's prepared statements off behind a pooler: with them, the 6th
    run of a statement on a client connection would name a statement that the server connection
    PgBouncer lends it next does not have."""
    async def main() -> list[int]:
        ids: list[int] = []
        for _ in range(3):  # 20 at once: several pool connections over PgBouncer's 2 server ones
            ids += await asyncio.gather(*(record.enqueue_async(i) for i in range(20)))
        for _ in range(3):
            ids += await record.using(unique=True).enqueue_many_async([(i,) for i in range(5)])
        ids += await record.enqueue_many_async([(i,) for i in range(1500)])
        await db.close_async_pools()
        return ids

    ids = asyncio.run(main())
    assert len(set(ids)) == 60 + 5 + 1500
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 60 + 5 + 1500
