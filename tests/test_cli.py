"""The `dj` command as a user runs it: real subprocesses against the session's test database.

Starting `python -m dj` costs about a second, so independent invocations run side by side.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import conninfo

from tests.support_jobs import permanent, record

WIDE = {"COLUMNS": "200"}  # rich tables and help: no wrapping or truncation in the output we check
STATE_KEYS = {"ready", "scheduled", "running", "dead", "retrying", "waiting"}  # waiting: dependencies
QUEUE_KEYS = STATE_KEYS | {"oldest_ready_age_s"}


def run_parallel(cli, calls: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    """Run several `dj` invocations at once. A call is (args...) or (args..., {env})."""
    def one(call):
        env = call[-1] if isinstance(call[-1], dict) else None
        args = call[:-1] if env is not None else call
        return cli(*args, env=env, timeout=60)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(one, call) for key, call in calls.items()}
        return {key: f.result() for key, f in futures.items()}


def error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """Check the error contract (one `error:` line on stderr, nothing on stdout, exit 2); return the line."""
    where = f"exit {result.returncode}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.returncode == code, where
    assert "Traceback" not in result.stderr + result.stdout, where
    assert result.stdout == "", where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    return lines[0]


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result.stdout


def enqueued_id(result: subprocess.CompletedProcess) -> int:
    m = re.search(r"enqueued job (\d+) ", ok(result))
    assert m, result.stdout
    return int(m.group(1))


def job_row(conn, job_id):
    return conn.execute("SELECT queue, priority, task, args, kwargs, run_at, attempts, locked_by, failed_at,"
                        " run_at - now() FROM jobs WHERE id = %s", (job_id,)).fetchone()


# --- errors -------------------------------------------------------------------------------------

def test_every_bad_input_is_one_error_line_and_exit_2(cli, conn):
    running = conn.execute("INSERT INTO jobs (task, locked_by, locked_at, attempts) "
                           "VALUES ('test.record', 'somehost:1', now(), 1) RETURNING id").fetchone()[0]
    noop = ("enqueue", "job", "tasks.demo.noop")
    calls = {
        "malformed args": (*noop, "--args", "[1, 2"),
        "args not an array": (*noop, "--args", '{"a": 1}'),
        "kwargs not an object": (*noop, "--kwargs", "[1]"),
        "unknown task": ("enqueue", "job", "no.such.task"),
        "unknown state": ("jobs", "list", "--state", "sleeping"),
        "show non-numeric id": ("jobs", "show", "abc"),
        "cancel non-numeric id": ("jobs", "cancel", "12x"),
        "min > max priority": ("work", "--burst", "--min-priority", "5", "--max-priority", "1"),
        "--in garbage": (*noop, "--in", "soon"),
        "--in and --at": (*noop, "--in", "30s", "--at", "2030-01-01T00:00:00+00:00"),
        "--in overflows": (*noop, "--in", "3000000d"),
        "NUL in args": (*noop, "--args", '["a\\u0000b"]'),
        "show missing id": ("jobs", "show", "987654"),
        "cancel running job": ("jobs", "cancel", str(running)),
    }
    results = run_parallel(cli, calls)
    lines = {key: error_line(result) for key, result in results.items()}
    expected = {
        "malformed args": "--args is not valid JSON",
        "args not an array": "--args must be a JSON array",
        "kwargs not an object": "--kwargs must be a JSON object",
        "unknown task": "unknown task 'no.such.task'",
        "unknown state": "unknown state 'sleeping'",
        "show non-numeric id": "Invalid value for 'ID'",
        "cancel non-numeric id": "Invalid value for 'ID'",
        "min > max priority": "--min-priority 5 is greater than --max-priority 1",
        "--in garbage": "--in 'soon'",
        "--in and --at": "either --in or --at",
        "--in overflows": "--in '3000000d'",
        "show missing id": "no job 987654",
        "cancel running job": f"job {running} is running",
        "NUL in args": "contain a NUL character",
    }
    for key, fragment in expected.items():
        assert fragment in lines[key], (key, lines[key])
    # Nothing was enqueued by any of them, and the running job is untouched.
    assert conn.execute("SELECT id, locked_by FROM jobs").fetchall() == [(running, "somehost:1")]


def test_unreachable_database_masks_the_password_and_never_uses_the_embedded_server(cli, tmp_path):
    home = tmp_path / "home"
    url = "postgresql://bob:s3cret@127.0.0.1:1/x"
    env_only = {"DJ_HOME": str(home), "DJ_DATABASE_URL": url}
    calls = {
        "flag": ("status", "--database-url", url, {"DJ_HOME": str(home)}),
        "env": ("enqueue", "job", "tasks.demo.noop", env_only),
        "dsn": ("work", "--burst", {"DJ_HOME": str(home),
                                 "DJ_DATABASE_URL": "host=127.0.0.1 port=1 user=bob password=s3cret dbname=x"}),
        "malformed": ("migrate", {"DJ_HOME": str(home), "DJ_DATABASE_URL": "postgresql://bob:s3cret@[::1"}),
    }
    results = run_parallel(cli, calls)
    for key, result in results.items():
        line = error_line(result)
        assert "s3cret" not in result.stdout + result.stderr, (key, line)
        if key == "dsn":
            assert "password=***" in line, line
        elif key == "malformed":
            assert "postgresql://bob:***@" in line, line
        else:
            assert "cannot connect to postgresql://bob:***@127.0.0.1:1/x" in line, (key, line)
    assert not (home / "pgdata").exists(), "dj fell back to the embedded server"


@pytest.fixture
def empty_db_url(db_url):
    """A database on the same server with no dj schema at all; dropped afterwards."""
    name = f"dj_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    yield conninfo.make_conninfo(db_url, dbname=name)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_missing_schema_says_run_dj_migrate_and_migrate_is_idempotent(cli, empty_db_url):
    flag = ("--database-url", empty_db_url)
    results = run_parallel(cli, {
        "status": ("status", *flag),
        "work": ("work", "--burst", *flag),
        "enqueue": ("enqueue", "job", "tasks.demo.noop", *flag),
        "jobs list": ("jobs", "list", *flag),
    })
    for key, result in results.items():
        assert "run 'dj migrate'" in error_line(result), key
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT to_regclass('jobs')").fetchone()[0] is None, "a failed command created tables"

    first, second = ok(cli("migrate", *flag)), ok(cli("migrate", *flag))
    assert first == second and first.startswith("schema is at ")
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1
    doc = json.loads(ok(cli("status", "--json", *flag)))
    assert doc["queues"] == {} and doc["totals"] == dict.fromkeys(STATE_KEYS, 0)


# --- the README's happy path --------------------------------------------------------------------

def test_enqueue_work_status_list_retry_cancel(cli, conn):
    noop = enqueued_id(cli("enqueue", "job", "tasks.demo.noop", "--args", "[]"))
    assert job_row(conn, noop)[:5] == ("default", 0, "tasks.demo.noop", [], {})
    dead_a, dead_b, dead_c = (permanent.enqueue(m) for m in "abc")

    ok(cli("work", "--burst"))
    assert conn.execute("SELECT id FROM jobs WHERE id = %s", (noop,)).fetchone() is None, "noop did not run"
    assert sorted(r[0] for r in conn.execute("SELECT marker FROM test_runs")) == ["a", "b", "c"]
    dead = conn.execute("SELECT id FROM jobs WHERE failed_at IS NOT NULL ORDER BY id").fetchall()
    assert dead == [(dead_a,), (dead_b,), (dead_c,)]

    results = run_parallel(cli, {"status": ("status", "--json"), "list": ("jobs", "list", "--state", "dead", WIDE)})
    doc = json.loads(ok(results["status"]))
    # oldest_snapshot added by issue 12; succeeded (kept successes), keys_at_limit and rate_limits by issue 15
    assert set(doc) == {"queues", "totals", "workers", "throughput", "oldest_snapshot", "succeeded", "keys_at_limit",
                        "rate_limits"}
    assert doc["keys_at_limit"] == []
    assert set(doc["queues"]) == {"default"}
    assert set(doc["queues"]["default"]) == QUEUE_KEYS
    assert set(doc["totals"]) == STATE_KEYS
    assert doc["queues"]["default"] == {"ready": 0, "scheduled": 0, "running": 0, "dead": 3, "retrying": 0,
                                        "waiting": 0, "oldest_ready_age_s": 0.0}
    assert doc["totals"] == {"ready": 0, "scheduled": 0, "running": 0, "dead": 3, "retrying": 0, "waiting": 0}
    assert doc["workers"] == []  # a burst worker removes its row when it exits
    assert doc["throughput"] == {"succeeded_last_minute": 1, "failed_last_minute": 3}

    listing = ok(results["list"])
    listed = [int(m) for m in re.findall(r"^\W*(\d+)\s*\W+\s*dead\b", listing, re.M)]
    assert listed == [dead_a, dead_b, dead_c], listing
    assert "Permanent: this can never work" in listing

    results = run_parallel(cli, {"retry": ("jobs", "retry", str(dead_a)), "cancel": ("jobs", "cancel", str(dead_c))})
    assert f"job {dead_a} is ready" in ok(results["retry"])
    row = job_row(conn, dead_a)
    assert row[6:9] == (0, None, None) and row[9].total_seconds() <= 0
    assert f"job {dead_c} cancelled" in ok(results["cancel"])
    assert job_row(conn, dead_c) is None

    assert "retrying 1 dead job(s)" in ok(cli("jobs", "retry", "--dead"))
    assert job_row(conn, dead_b)[6:9] == (0, None, None)
    assert sorted(r[0] for r in conn.execute("SELECT id FROM jobs")) == [dead_a, dead_b]


def test_enqueue_options_land_in_the_row(cli, conn):
    results = run_parallel(cli, {
        "in": ("enqueue", "job", "tasks.demo.noop", "--in", "30s"),
        "at": ("enqueue", "job", "tasks.demo.noop", "--at", "2031-02-03T04:05:06+02:00"),
        "queue": ("enqueue", "job", "tasks.demo.noop", "--queue", "mail", "--priority", "-7",
                  "--args", '[1, "two", null]', "--kwargs", '{"k": [true]}'),
    })
    delay = conn.execute("SELECT extract(epoch FROM run_at - created_at) FROM jobs WHERE id = %s",
                         (enqueued_id(results["in"]),)).fetchone()[0]
    assert 25 <= delay <= 30.5, delay  # created_at is the INSERT, a moment after dj computed run_at
    at = job_row(conn, enqueued_id(results["at"]))
    assert at[5] == datetime(2031, 2, 3, 2, 5, 6, tzinfo=timezone.utc)
    assert job_row(conn, enqueued_id(results["queue"]))[:5] == ("mail", -7, "tasks.demo.noop", [1, "two", None],
                                                                {"k": [True]})


# --- status counts ------------------------------------------------------------------------------

def test_status_json_counts_every_state_per_queue(cli, conn):
    rows = [
        # queue, run_at offset (s), attempts, locked_by, dead
        ("alpha", -100, 0, None, False),   # ready, the oldest
        ("alpha", -10, 2, None, False),    # ready, retrying
        ("alpha", 3600, 0, None, False),   # scheduled
        ("alpha", 3600, 1, None, False),   # scheduled: a retry waiting for its backoff
        ("alpha", -50, 1, "w1", False),    # running
        ("alpha", -50, 25, None, True),    # dead
        *[("beta", -5, 0, None, False)] * 3,
        *[("beta", -5, 1, "w1", False)] * 2,
        *[("beta", -5, 3, None, True)] * 2,
        ("beta", 60, 4, None, False),      # scheduled, retrying
    ]
    for queue, offset, attempts, locked_by, dead in rows:
        conn.execute(
            "INSERT INTO jobs (queue, task, run_at, attempts, locked_by, locked_at, failed_at, last_error) "
            "VALUES (%s, 'test.record', now() + make_interval(secs => %s), %s, %s::text,"
            " CASE WHEN %s::text IS NOT NULL THEN now() END, CASE WHEN %s THEN now() END,"
            " CASE WHEN %s THEN 'boom' END)",
            (queue, offset, attempts, locked_by, locked_by, dead, dead))
    conn.execute("INSERT INTO workers (name, host, pid, queues, concurrency, heartbeat_at) "
                 "VALUES ('w1', 'somehost', 4242, ARRAY['alpha', 'beta'], 4, now() - interval '2 seconds')")
    # Waiting for a dependency (dj/dependencies.py): run_at 'infinity', not scheduled.
    conn.execute("INSERT INTO jobs (queue, task, run_at) VALUES ('beta', 'test.record', 'infinity')")
    conn.execute("INSERT INTO job_stats (bucket, queue, succeeded, failed) VALUES "
                 "(date_trunc('second', now()), 'alpha', 7, 2), (now() - interval '5 minutes', 'alpha', 100, 100)")

    doc = json.loads(ok(cli("status", "--json")))
    alpha, beta = doc["queues"].pop("alpha"), doc["queues"].pop("beta")
    assert doc["queues"] == {}
    assert 100 <= alpha.pop("oldest_ready_age_s") < 130
    assert 5 <= beta.pop("oldest_ready_age_s") < 35
    assert alpha == {"ready": 2, "scheduled": 2, "running": 1, "dead": 1, "retrying": 2, "waiting": 0}
    assert beta == {"ready": 3, "scheduled": 1, "running": 2, "dead": 2, "retrying": 1, "waiting": 1}
    assert doc["totals"] == {"ready": 5, "scheduled": 3, "running": 3, "dead": 3, "retrying": 3, "waiting": 1}
    [worker] = doc["workers"]
    assert 2 <= worker.pop("heartbeat_age_s") < 32
    assert worker == {"name": "w1", "queues": ["alpha", "beta"], "running": 3}
    assert doc["throughput"] == {"succeeded_last_minute": 7, "failed_last_minute": 2}


# --- help ---------------------------------------------------------------------------------------

def test_help(cli):
    results = run_parallel(cli, {"top": ("--help", WIDE), "work": ("work", "--help", WIDE),
                                 "bench": ("bench", "--help", WIDE)})
    text = ok(results["top"])
    for command in ("migrate", "enqueue", "work", "status", "jobs", "db", "counters"):
        assert re.search(rf"\b{command}\b", text), command
    text = ok(results["work"])
    for option in ("--queues", "--concurrency", "--processes", "--burst", "--min-priority", "--max-priority",
                   "--lock-timeout", "--shutdown-timeout", "--database-url"):
        assert option in text, option
    # Rich markup swallows unescaped "[...]" in help texts.
    assert "[env DJ_LOCK_TIMEOUT; default 300]" in text and "[default: the concurrency]" in text
    text = ok(results["bench"])
    assert "pip install 'djq[bench]'" in text and "[default: 10000; 2000 with --quick]" in text


# --- hostile strings ----------------------------------------------------------------------------

HOSTILE = ["x'; DROP TABLE jobs; --", 'q"; DELETE FROM jobs; --', "$$; DROP TABLE workers; $$", "%s", "%(x)s",
           "{}", "\\", "\n\t ", "ünïcødé ☃ 🚀", "日本語のキュー", "\u202etxt.exe"]
# PostgreSQL text cannot hold NUL; that case is tested on its own below.
TEXT = st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(queue=st.one_of(st.sampled_from(HOSTILE), TEXT), arg=st.one_of(st.sampled_from(HOSTILE), TEXT))
def test_queue_names_and_args_are_stored_exactly(conn, queue, arg):
    job_id = record.using(queue=queue).enqueue(arg, note=arg)
    assert conn.execute("SELECT queue, args, kwargs FROM jobs WHERE id = %s", (job_id,)).fetchone() == (
        queue, [arg], {"note": arg})
    assert conn.execute("SELECT to_regclass('jobs') IS NOT NULL AND to_regclass('workers') IS NOT NULL"
                        ).fetchone()[0]


def test_nul_in_an_argument_is_refused_and_writes_nothing(conn):
    with pytest.raises(ValueError, match="NUL character"):  # refused before any I/O (dj.enqueueing)
        record.enqueue("a\x00b")
    with pytest.raises((TypeError, ValueError, psycopg.DataError)):
        record.using(queue="a\x00b").enqueue("x")
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_hostile_strings_through_the_cli(cli, conn):
    queue = "x'; DROP TABLE jobs; -- [/] ünï ☃"  # "[/]": rich markup once crashed the tables
    args = ["it's; DROP TABLE jobs; --", "ünïcødé 🚀", "%s", 'q"uote', "back\\slash"]
    kwargs = {'k"ey\'': "v;--", "ключ": "$$"}
    job_id = enqueued_id(cli("enqueue", "job", "tasks.demo.noop", "--queue", queue, "--args", json.dumps(args),
                             "--kwargs", json.dumps(kwargs)))
    assert job_row(conn, job_id)[:5] == (queue, 0, "tasks.demo.noop", args, kwargs)
    results = run_parallel(cli, {"json": ("status", "--json"), "table": ("status", WIDE),
                                 "list": ("jobs", "list", "--queue", queue, WIDE)})
    doc = json.loads(ok(results["json"]))
    assert list(doc["queues"]) == [queue] and doc["queues"][queue]["ready"] == 1
    assert re.search(rf"{re.escape(queue)}\s*\W\s*1\b", ok(results["table"])), results["table"].stdout
    assert re.search(rf"^\W*{job_id}\W+ready\W+{re.escape(queue)}\s", ok(results["list"]), re.M), results["list"].stdout
    assert conn.execute("SELECT to_regclass('jobs') IS NOT NULL").fetchone()[0]
