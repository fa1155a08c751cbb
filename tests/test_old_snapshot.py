"""The oldest snapshot holding back vacuum of jobs, as the operator sees it: `dj status` (human and
--json), the dashboard and /metrics, each with a REPEATABLE READ transaction held open in the test."""

from __future__ import annotations

import json
import time
import warnings
from contextlib import contextmanager

import psycopg

from dj import admin
from dj.web import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@contextmanager
def held_snapshot(db_url: str, app: str = "nightly report", age: float = 1.2):
    """A session that took a snapshot (REPEATABLE READ and a SELECT) and sits idle in its transaction."""
    with psycopg.connect(db_url, application_name=app) as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*)\nFROM jobs -- the report").fetchone()
        time.sleep(age)
        yield holder.info.backend_pid


def test_status_json_adds_the_oldest_snapshot_and_keeps_every_other_key(conn, db_url, cli):
    assert admin.status(conn)["oldest_snapshot"] is None
    with held_snapshot(db_url) as pid:
        doc = json.loads(cli("status", "--json").stdout)
        human = cli("status", env={"COLUMNS": "200"}).stdout
    assert set(doc) == {"queues", "totals", "workers", "throughput", "oldest_snapshot", "succeeded", "keys_at_limit",
                        "rate_limits"}
    snap = doc["oldest_snapshot"]
    assert set(snap) == {"age_s", "pid", "application_name", "state", "query"}
    assert snap["pid"] == pid and snap["application_name"] == "nightly report"
    assert snap["state"] == "idle in transaction"
    assert snap["query"] == "SELECT count(*)"  # the first line only
    assert 1.0 <= snap["age_s"] < 120
    assert f"pid {pid}" in human and "nightly report" in human
    assert admin.status(conn)["oldest_snapshot"] is None  # gone with its transaction


def test_dashboard_and_metrics_show_it(db_url, monkeypatch):
    monkeypatch.setenv("DJ_SNAPSHOT_WARN_AFTER", "1")
    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        page = client.get("/").text
        assert "data-snapshot-warning" not in page and "oldest snapshot" in page
        with held_snapshot(db_url, app="pg_dump") as pid:
            page = client.get("/").text
            metrics = client.get("/metrics").text
        assert "data-snapshot-warning" in page and f"pid {pid}" in page and "pg_dump" in page
        lines = {line.split(" ")[0]: line for line in metrics.splitlines() if line.startswith("dj_oldest_snapshot")}
        assert float(lines["dj_oldest_snapshot_age_seconds"].split()[-1]) >= 1.0
        info = [line for line in metrics.splitlines() if line.startswith("dj_oldest_snapshot_info{")]
        assert len(info) == 1 and f'pid="{pid}"' in info[0] and 'application_name="pg_dump"' in info[0]
        after = client.get("/metrics").text
        assert "dj_oldest_snapshot_age_seconds 0.0" in after
        assert "dj_oldest_snapshot_info{" not in after
