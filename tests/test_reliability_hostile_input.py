"""Hostile input: rows and jobs built to hurt the worker. Each job ends dead with a clear
last_error, and the same worker process goes on running other jobs."""

import json
import os

import pytest

from dj import DatabaseUnavailable
from tests.conftest import wait_for
from tests.support_jobs import record
from tests.support_reliability import (RELIABILITY_ENV, raise_bad_text, raise_enormous, raise_unpicklable,
                                       raise_unprintable, size)


def dead_count(conn):
    return conn.execute("SELECT count(*) FROM jobs WHERE failed_at IS NOT NULL").fetchone()[0]


def dead_jobs(conn):
    return {r[0]: r[1] for r in conn.execute("SELECT task, last_error FROM jobs WHERE failed_at IS NOT NULL")}


def test_hostile_jobs_go_dead_with_a_clear_error_and_the_worker_carries_on(conn, worker_process):
    worker = worker_process("--concurrency", "2", env=RELIABILITY_ENV)
    record.enqueue("before")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs").fetchone()[0] == 1, message="a first job")

    raise_unpicklable.enqueue()
    raise_unprintable.enqueue()
    raise_enormous.enqueue(50)
    raise_bad_text.enqueue()
    # Rows no client library would write, inserted by hand.
    conn.execute("INSERT INTO jobs (task, args) VALUES ('rel.size', %s::jsonb)",
                 (json.dumps(["x" * 10_000_000]),))
    conn.execute("INSERT INTO jobs (task, args) VALUES ('rel.size', %s::jsonb)",
                 ("[" * 5000 + "]" * 5000,))
    conn.execute("INSERT INTO jobs (task, args) VALUES ('no.such.task', '[]')")
    conn.execute("INSERT INTO jobs (task, args) VALUES ('test.record', '\"not an array\"')")
    conn.execute("SELECT pg_notify('dj_jobs', 'default')")  # rows written by hand wake nobody
    wait_for(lambda: dead_count(conn) == 8, timeout=60, message="eight dead jobs")

    errors = dead_jobs(conn)
    assert "Unpicklable: an exception that cannot be pickled" in errors["rel.raise_unpicklable"]
    assert "Unprintable" in errors["rel.raise_unprintable"]
    enormous = errors["rel.raise_enormous"]
    assert "ValueError: enormous xxx" in enormous and "[truncated]" in enormous and len(enormous) < 30_000
    assert "bad text" in errors["rel.raise_bad_text"]
    sized = sorted(e for t, e in conn.execute(
        "SELECT task, last_error FROM jobs WHERE task = 'rel.size'"))
    assert any("arguments too large" in e and "10.0 MB" in e for e in sized), sized
    assert any("could not be decoded" in e for e in sized), sized
    assert "unknown task 'no.such.task'" in errors["no.such.task"]
    assert "args must be a JSON array" in errors["test.record"]

    record.enqueue("after")
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs WHERE marker = 'after'").fetchone()[0] == 1,
             message="a job after the hostile ones")
    assert worker.poll() is None, worker.log()
    pids = {r[0] for r in conn.execute("SELECT pid FROM test_runs")}
    assert pids == {worker.pid}, "the same worker process ran the jobs before and after"
    assert "Traceback" not in worker.log()
    assert not [line for line in worker.log_lines if len(line) > 2000], "no enormous log lines"


def test_enqueue_refuses_arguments_over_the_size_limit_and_writes_nothing(unreachable_database):
    """With no database to reach, a refused enqueue raises its own error: it wrote nothing."""
    with pytest.raises(ValueError, match="limit"):
        size.enqueue("x" * 10_000_000)
    with pytest.raises(ValueError, match="limit"):
        size.enqueue_many([("small",), ("x" * 10_000_000,)])
    with pytest.raises(DatabaseUnavailable):
        size.enqueue("x" * 100_000)  # large, but under the limit: it goes on to the database


def test_a_job_row_naming_an_importable_function_that_is_not_registered_runs_nothing(conn, run_burst, tmp_path):
    """Nothing in the database can name code: `os.system` is importable, but it is not a job."""
    target = tmp_path / "pwned"
    for task, args in [("os.system", [f"touch {target}"]), ("subprocess.call", [["touch", str(target)]]),
                       ("builtins.eval", [f"open({str(target)!r}, 'w')"]),
                       ("tests.support_reliability._wait_for_gate", [str(tmp_path), "x", 1])]:
        conn.execute("INSERT INTO jobs (task, args) VALUES (%s, %s::jsonb)", (task, json.dumps(args)))
    run_burst()
    rows = conn.execute("SELECT task, failed_at IS NOT NULL, last_error FROM jobs").fetchall()
    assert len(rows) == 4 and all(dead and "unknown task" in error for _, dead, error in rows), rows
    assert not target.exists()


@pytest.mark.no_database
def test_no_module_is_imported_or_text_evaluated_from_database_contents():
    """Read dj's source: the one dynamic import is load_task_modules, fed from DJ_TASKS (plus the
    bench's fixed list of peer packages, and dj's own submodules, imported on first use); there is no eval, exec or unpickling anywhere."""
    import ast

    import dj

    package = os.path.dirname(dj.__file__)
    dynamic = []
    for folder, _, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
                f = call.func
                called = (f.id if isinstance(f, ast.Name) else
                          f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else "?")
                if called in {"eval", "exec", "compile", "__import__", "importlib.import_module", "import_module",
                              "pickle.loads", "pickle.load", "marshal.loads", "runpy.run_module", "runpy.run_path",
                              "importlib.__import__", "spec_from_file_location"}:
                    inside = [fn.name for fn in functions
                              if fn.lineno <= call.lineno <= (fn.end_lineno or fn.lineno)]
                    dynamic.append((os.path.relpath(path, package), inside[-1] if inside else None, called,
                                    ast.unparse(call.args[0]) if call.args else ""))
    allowed = {("task.py", "load_task_modules", "importlib.import_module", "module"),
               ("bench_peers.py", "measure", "__import__", "name"),
               # dj's own names, imported on first use (see dj/__init__.py): a fixed table and the
               # attribute names of `dj.<submodule>` in code, never data
               ("__init__.py", "__getattr__", "importlib.import_module", "f'{__name__}.{module}'"),
               ("__init__.py", "__getattr__", "importlib.import_module", "f'{__name__}.{name}'")}
    assert set(dynamic) <= allowed, set(dynamic) - allowed
    import inspect

    from dj import task

    source = inspect.getsource(task.load_task_modules)
    assert 'for module in ["tasks", *config.task_modules()]' in source
    bench_source = open(os.path.join(package, "bench_peers.py"), encoding="utf-8").read()
    assert "for name in PEERS:" in bench_source
