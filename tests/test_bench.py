"""`dj bench --quick --json` runs end to end and reports every figure of the performance issue.

No test here asserts a speed: the figures depend on the machine. They only have to be numbers.
"""

from __future__ import annotations

import io
import json
import math

import psycopg
import pytest
from rich.console import Console

from dj import bench


def _scratch_databases(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'dj\\_bench\\_%'")]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_json_reports_every_key_as_numbers_and_cleans_up(cli, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO jobs (queue, task) VALUES ('default', 'tests.untouched')")
        scratch_before = set(_scratch_databases(conn))
    result = cli("bench", "--quick", "--json", timeout=240)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # exactly one JSON object on stdout; the progress goes to stderr

    for key in ("raw_ceiling_per_s", "enqueue_single_per_s", "enqueue_single_own_conn_per_s", "insert_single_per_s",
                "enqueue_bulk_per_s"):
        assert _number(doc[key]) and doc[key] > 0, key
    for key in ("enqueue_per_s", "insert_per_s", "ratio"):
        assert _number(doc["async_single"][key]) and doc["async_single"][key] > 0, key
    assert set(doc["drain_per_s"]) == {"1", "2"}
    assert all(_number(v) and v > 0 for v in doc["drain_per_s"].values())
    for key in ("p50", "p95", "p99"):
        assert _number(doc["latency_ms"][key]), key
    assert doc["latency_ms"]["p50"] <= doc["latency_ms"]["p95"] <= doc["latency_ms"]["p99"]
    for key in ("first_per_s", "last_per_s", "ratio", "table_bytes_before", "table_bytes_after"):
        assert _number(doc["soak"][key]), key
    events = doc["soak"]["rounds_events"]
    assert len(events) == len(doc["soak"]["rounds_per_s"]) and all(
        e["checkpoints"] >= 0 and e["vacuums"] >= 0 for e in events)
    for key in ("without_per_s", "with_per_s", "ratio", "held_s"):
        assert _number(doc["old_snapshot"][key]), key
    assert _number(doc["old_snapshot"]["latency_ms"]["p99"])
    fair = doc["fairness"]
    for key in ("b_last_start_s", "b_first_start_s", "a_still_waiting"):
        assert _number(fair[key]), key
    assert fair["tenant_a_jobs"] == 10_000 and fair["tenant_b_jobs"] == 100
    assert 0 <= fair["b_first_start_s"] <= fair["b_last_start_s"]
    for key in ("serial_s", "batched_s", "ratio"):
        assert _number(doc["rebuild"][key]), key
    assert doc["rebuild"]["correct"] is True
    for key in ("per_s", "off_per_s", "ratio"):  # the keep section (issue 15)
        assert _number(doc["keep"][key]) and doc["keep"][key] > 0, key
    assert doc["keep"]["kept_rows"] > 0
    deps = doc["deps"]  # the deps section (issue 15)
    for key in ("per_s", "plain_per_s", "ratio"):
        assert _number(deps[key]) and deps[key] > 0, key
    assert deps["hops"] == 20 and 0 < deps["hop_ms"]["p50"] <= deps["hop_ms"]["p99"] <= deps["hop_ms"]["max"]
    assert "peers" not in doc  # only with --peers
    machine = doc["machine"]
    assert _number(machine["cpu_count"]) and machine["postgresql"] and machine["python"]

    with psycopg.connect(db_url, autocommit=True) as conn:
        # the user's job is untouched, and nothing of the bench is left behind
        assert conn.execute("SELECT queue, task FROM jobs").fetchall() == [("default", "tests.untouched")]
        assert conn.execute("SELECT count(*) FROM job_stats WHERE queue LIKE 'bench-%'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM job_results WHERE queue LIKE 'bench-%'").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM job_dependencies").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'dj_bench%'").fetchone()[0] == 0
        # the scratch database of the rebuild is dropped (databases left by other, interrupted
        # runs on the same server are not this run's)
        assert set(_scratch_databases(conn)) <= scratch_before

    # the table `dj bench` prints without --json is drawn from the same document
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(bench.table(doc))
    text = console.export_text()
    assert "drain, 2 processes" in text and "latency p50/p95/p99" in text and "rebuild" in text
    assert "old snapshot" in text and "enqueue_async, one per call" in text
    assert "fairness: last of B's 100 jobs started" in text
    assert "drain with after= a batch" in text and "dependency chain of 20 hops" in text


@pytest.mark.no_database
@pytest.mark.parametrize("text, expected", [("2", (1, 2)), ("3", (1, 2, 3)), ("1,4", (1, 4)), ("2,1", (1, 2))])
def test_parse_processes(text, expected):
    assert bench.parse_processes(text) == expected


@pytest.mark.no_database
@pytest.mark.parametrize("text", ["0", "x", "1,-2", ""])
def test_parse_processes_rejects_bad_input(text):
    with pytest.raises(bench.DJError):
        bench.parse_processes(text)


def test_bad_processes_is_a_one_line_error(cli, db_url):
    result = cli("bench", "--processes", "zero")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.no_database
def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 50 and bench.percentile(values, 99) == 99
    assert bench.percentile([3.0], 99) == 3.0


def test_only_measures_the_named_sections_and_prints_their_rows(cli, db_url):
    result = cli("bench", "--quick", "--json", "--only", "drain,latency", "--processes", "1", timeout=240)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc["drain_per_s"]) == {"1"} and _number(doc["drain_per_s"]["1"])
    assert _number(doc["latency_ms"]["p99"])
    for skipped in ("raw_ceiling_per_s", "enqueue_single_per_s", "async_single", "soak", "old_snapshot", "rebuild",
                    "peers", "fairness"):
        assert skipped not in doc, skipped
    assert doc["config"]["only"] == ["drain", "latency"]
    out = io.StringIO()
    Console(file=out, width=200).print(bench.table(doc))
    assert "drain, 1 process" in out.getvalue() and "soak" not in out.getvalue()


def test_only_refuses_an_unknown_section(cli):
    result = cli("bench", "--only", "drain,warp-speed")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown bench section(s) warp-speed")
