"""Django's Tasks framework on dj (dj.contrib.django.Backend), with the minimal project in
tests/django_project: enqueue in and out of atomic(), priorities, run_after, failures and
results, all run by real `dj work` / `manage.py dj_work` processes on the test database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import psycopg
import pytest

from tests.conftest import ROOT

django = pytest.importorskip("django", reason="Django is in dj's dev extra; install it with pip install -e '.[dev]'")

SETTINGS = "tests.django_project.settings"


@pytest.fixture
def tasks(db_url, monkeypatch):
    """The test project's task module, with Django set up on the test database."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", SETTINGS)
    django.setup()
    from tests.django_project import tasks as module

    yield module
    from django.db import connections

    connections.close_all()


def jobs(conn: psycopg.Connection, marker: str) -> list[tuple]:
    return conn.execute("SELECT id, task, queue, priority, run_at > now() FROM jobs WHERE args->>0 = %s",
                        (marker,)).fetchall()


def runs(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT marker, attempt FROM test_runs ORDER BY at").fetchall()


def work(*args: str, manage: bool = False, failing: str | None = None) -> subprocess.CompletedProcess:
    """A real worker in a Django project's environment: `dj work`, or `django-admin dj_work`. The
    framework logs a failed task's exception (logger.exception, for error trackers); `failing`
    names the one error whose tracebacks may appear, and no other may."""
    command = [sys.executable, "-m", "django", "dj_work"] if manage else [sys.executable, "-m", "dj", "work"]
    result = subprocess.run([*command, "--burst", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "DJANGO_SETTINGS_MODULE": SETTINGS})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Traceback") == (result.stderr.splitlines().count(failing) if failing else 0), result.stderr
    return result


def test_enqueue_outside_atomic_writes_a_dj_job_at_once(tasks, conn):
    from dj.contrib.django.compat import TaskResultStatus

    result = tasks.record.enqueue("outside")
    assert result.status == TaskResultStatus.READY
    assert result.backend == "default"
    [(job_id, name, queue, priority, later)] = jobs(conn, "outside")
    assert (str(job_id), name, queue, priority, later) == (
        result.id, "tests.django_project.tasks.record", "default", 0, False)


def test_enqueue_inside_atomic_is_part_of_djangos_transaction(tasks, conn):
    from django.db import transaction

    with transaction.atomic():
        tasks.record.enqueue("committed")
        assert jobs(conn, "committed") == []  # another session cannot see it before the commit
    assert len(jobs(conn, "committed")) == 1

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback):
        with transaction.atomic():
            tasks.record.enqueue("rolled back")
            raise Rollback
    assert jobs(conn, "rolled back") == []


def test_djangos_priorities_run_higher_first_and_run_after_waits(tasks, conn):
    from django.utils import timezone

    tasks.record.using(priority=-10).enqueue("low")
    tasks.record.using(priority=50).enqueue("high")
    tasks.record.enqueue("middle")
    tasks.record.using(queue_name="other").enqueue("other queue")
    tasks.record.using(run_after=timezone.now() + timedelta(hours=1)).enqueue("later")
    assert [row[3] for row in jobs(conn, "high")] == [-50]  # Django 50 is dj -50: claimed first

    work("--concurrency", "1")
    assert [marker for marker, _ in runs(conn)] == ["high", "middle", "low"]
    assert jobs(conn, "later")[0][4] is True  # still waiting for its run_after
    assert len(jobs(conn, "other queue")) == 1  # dj work --queues default did not take it


def test_a_task_that_raises_is_retried_then_failed_with_its_error(tasks, conn):
    from dj.contrib.django.compat import TaskResultDoesNotExist, TaskResultStatus

    result = tasks.explode.enqueue("x")
    work(manage=True, failing="ValueError: boom x")  # attempt 1 fails; the retry waits for its backoff
    waiting = tasks.explode.get_result(result.id)
    assert waiting.status == TaskResultStatus.READY
    assert "boom x" in waiting.errors[0].traceback

    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (int(result.id),))  # skip the 6 s backoff
    work(manage=True, failing="ValueError: boom x")  # attempt 2 of MAX_ATTEMPTS 2: dead
    dead = tasks.explode.get_result(result.id)
    assert dead.status == TaskResultStatus.FAILED
    assert dead.attempts == 2
    assert dead.errors[0].exception_class is ValueError
    assert dead.finished_at is not None
    assert runs(conn) == [("x", 1), ("x", 2)]
    with pytest.raises(ValueError, match="failed"):
        dead.return_value

    ok = tasks.record.enqueue("fine")
    work()
    with pytest.raises(TaskResultDoesNotExist, match="deletes a job when it succeeds"):
        tasks.record.get_result(ok.id)


def test_a_task_that_takes_context_sees_its_attempt(tasks, conn):
    tasks.with_context.enqueue("ctx")
    work()
    assert runs(conn) == [("ctx", 1)]


def test_an_async_task_runs_on_the_workers_event_loop(tasks, conn):
    from dj.contrib.django import Backend

    assert Backend.supports_async_task
    tasks.record_async.enqueue("async")
    work()
    assert runs(conn) == [("async", 1)]


def test_dj_commands_use_djangos_database_when_dj_database_url_is_unset(tasks, db_url):
    tasks.record.enqueue("status")
    env = {k: v for k, v in os.environ.items() if k != "DJ_DATABASE_URL"}
    result = subprocess.run([sys.executable, "-m", "dj", "status", "--json"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": SETTINGS, "DJANGO_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads(result.stdout)["queues"]["default"]["ready"] == 1


@pytest.mark.no_database
def test_the_backend_uses_djangos_own_framework_from_django_6_and_the_backport_before():
    from dj.contrib.django import compat

    assert compat.FRAMEWORK == ("django.tasks" if django.VERSION >= (6,) else "django_tasks")


def test_in_djs_test_mode_an_enqueue_is_captured_without_touching_djangos_database(tasks, conn):
    import dj
    from django.db import connections

    connections.close_all()
    with dj.testing.capture() as jobs:
        result = tasks.record.using(priority=30).enqueue("captured")
    [job] = jobs.jobs
    assert (job.task, job.args, job.priority, str(job.id)) == ("tests.django_project.tasks.record", ["captured"], -30,
                                                               result.id)
    assert connections["default"].connection is None
    assert jobs_rows(conn) == 0


def jobs_rows(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
