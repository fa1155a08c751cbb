"""The README's application examples (examples/) run: a Starlette app with a SQLAlchemy AsyncSession
answers a request against the test database, and the sync script places an order; a real worker
runs each one's job (the async one on its event loop)."""

import asyncio
import importlib
import subprocess
import sys

import pytest
from starlette.testclient import TestClient

from tests.conftest import ROOT, dj_cli
from tests.support_sqlalchemy import sqlalchemy_url


@pytest.fixture
def app_url(db_url, monkeypatch):
    url = sqlalchemy_url(db_url).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


def _fresh(module: str):
    """The example imported now, so that it reads DATABASE_URL of this test."""
    sys.modules.pop(module, None)
    return importlib.import_module(module)


def test_the_starlette_example_writes_the_row_and_its_job_in_one_transaction(app_url, conn):
    example = _fresh("examples.starlette_app")
    with TestClient(example.app) as client:
        created = client.post("/signup", json={"email": "ada@example.com"})
        assert created.status_code == 201, created.text
        again = client.post("/signup", json={"email": "ada@example.com"})
        assert again.status_code == 409  # rolled back: no second row, and no second job
    body = created.json()
    assert conn.execute("SELECT id, task, queue, args FROM jobs").fetchall() == [
        (body["job"], "examples.send_welcome", "mail", [body["id"]])]
    assert conn.execute("SELECT email FROM example_signups").fetchall() == [("ada@example.com",)]
    # The job itself, called directly (the lifespan disposed of the engine; this loop gets its own),
    # then run by a real worker, on its event loop.
    assert asyncio.run(example.send_welcome(body["id"])) == "welcome, ada@example.com"
    worked = dj_cli("work", "--burst", "--queues", "mail", env={"DJ_TASKS": "examples.starlette_app"})
    assert worked.returncode == 0, worked.stderr
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert conn.execute("SELECT sum(succeeded), sum(failed) FROM job_stats").fetchone() == (1, 0)


def test_the_sync_example_places_an_order_whose_job_a_worker_runs(app_url, conn):
    result = subprocess.run([sys.executable, "examples/sync_app.py", "ada", "4200"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    order_id, job_id = conn.execute("SELECT o.id, j.id FROM example_orders o, jobs j").fetchone()
    assert result.stdout.strip() == f"order {order_id}, invoice job {job_id}"
    assert conn.execute("SELECT task, args FROM jobs").fetchall() == [("examples.send_invoice", [order_id])]
    worked = dj_cli("work", "--burst", env={"DJ_TASKS": "examples.sync_app"})
    assert worked.returncode == 0, worked.stderr
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    assert conn.execute("SELECT sum(succeeded), sum(failed) FROM job_stats").fetchone() == (1, 0)
