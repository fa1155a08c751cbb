"""OpenTelemetry (dj/tracing.py, the extra dj[otel]): `dj enqueue` spans in this process, recorded
by the SDK's InMemorySpanExporter; `dj perform` spans in a real `dj work --burst` process, which
configures the SDK from tests/support_tracing.py and writes its spans to files read here. The trace
context crosses in the job row. The SDK is in the dev extra: without it this module fails to
import, it does not skip."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dj import enqueueing, tracing
from tests import support_tracing as tasks
from tests.conftest import ROOT

WORKER_TASKS = os.environ["DJ_TASKS"] + ",tests.support_tracing"


@pytest.fixture
def otel(monkeypatch):
    """An SDK tracer provider for this process, its spans kept in memory. dj's tracer is pointed at
    it directly: the global provider can be set only once per process."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("dj"))
    provider.app = provider.get_tracer("app")
    provider.exporter = exporter
    return provider


@pytest.fixture
def perform(cli, tmp_path):
    """Drain queues with a real worker process that exports its spans; returns them (as dicts, by
    the SDK's to_json), the `dj perform` ones keyed by job id, each a list of its attempts."""

    def run(*queues: str, processes: int = 1) -> tuple[dict[str, list[dict]], list[dict]]:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # this run's spans only
        out.mkdir()
        result = cli("work", "--burst", "--queues", ",".join(queues or ("default",)), "--concurrency", "4",
                     "--processes", str(processes), env={"DJ_TASKS": WORKER_TASKS, "DJ_TEST_SPANS": str(out)})
        assert result.returncode == 0, result.stderr
        spans = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
        performed: dict[str, list[dict]] = {}
        for s in spans:
            if s["name"] == "dj perform":
                performed.setdefault(s["attributes"]["messaging.message.id"], []).append(s)
        for attempts in performed.values():
            attempts.sort(key=lambda s: s["attributes"]["messaging.dj.attempt"])
        return performed, spans

    return run


def hex_trace(span) -> str:
    return f"0x{span.context.trace_id:032x}"


def hex_span(span) -> str:
    return f"0x{span.context.span_id:016x}"


def enqueue_spans(otel) -> list:
    spans = [s for s in otel.exporter.get_finished_spans() if s.name == "dj enqueue"]
    assert all(s.kind == SpanKind.PRODUCER for s in spans)
    return spans


def test_a_jobs_perform_span_is_a_child_of_its_enqueue_across_processes(otel, perform, db_url, conn, monkeypatch):
    monkeypatch.setattr(enqueueing, "COPY_AT", 3)  # so that enqueue_many of 3 takes the COPY path
    with otel.app.start_as_current_span("request") as request:
        single = tasks.ok.enqueue("single")
        unique = tasks.ok.using(unique_key="u").enqueue("unique")
        small = tasks.ok.enqueue_many([("m1",), ("m2",)])
        copied = tasks.ok.using(queue="otel-bulk").enqueue_many([("c1",), ("c2",), ("c3",)])
        with psycopg.connect(db_url) as caller:  # in the caller's transaction, committed on exit
            in_tx = tasks.ok.using(conn=caller).enqueue("tx")
        coro = asyncio.run(tasks.async_ok.enqueue_async("a"))
        coro_many = asyncio.run(tasks.async_ok.enqueue_many_async([("a1",), ("a2",)]))
        chained = tasks.chain.enqueue("chain")
        waiting = tasks.ok.using(after=[single]).enqueue("after")  # ENQUEUE_AFTER (dj/dependencies.py)

    calls = [[single], [unique], small, copied, [in_tx], [coro], coro_many, [chained], [waiting]]
    producers = enqueue_spans(otel)
    assert len(producers) == len(calls)
    # Each row carries its enqueue's span context: a W3C traceparent in the request's trace.
    rows = dict(conn.execute("SELECT id, trace_context FROM jobs").fetchall())
    for span, ids in zip(producers, calls):
        assert span.parent.span_id == request.get_span_context().span_id
        assert span.attributes["messaging.system"] == "dj"
        assert span.attributes["messaging.operation.type"] == "send"
        for job_id in ids:
            version, trace_id, span_id, flags = rows[job_id]["traceparent"].split("-")
            assert (f"0x{trace_id}", f"0x{span_id}") == (hex_trace(span), hex_span(span))
            assert int(flags, 16) & 1  # sampled
    assert producers[0].attributes["messaging.message.id"] == str(single)
    assert producers[0].attributes["messaging.destination.name"] == "default"
    assert producers[0].attributes["messaging.dj.task"] == "otel.ok"
    assert producers[3].attributes["messaging.batch.message_count"] == 3
    assert producers[3].attributes["messaging.destination.name"] == "otel-bulk"
    assert producers[5].attributes["messaging.dj.task"] == "otel.async_ok"

    performed, spans = perform("default", "otel-bulk", processes=2)  # supervised children, as in production
    for span, ids in zip(producers, calls):
        for job_id in ids:
            [attempt] = performed.pop(str(job_id))
            assert attempt["kind"] == "SpanKind.CONSUMER"
            assert attempt["context"]["trace_id"] == hex_trace(request)
            assert attempt["parent_id"] == hex_span(span)
            assert attempt["status"]["status_code"] == "UNSET"
            assert attempt["attributes"]["messaging.system"] == "dj"
            assert attempt["attributes"]["messaging.operation.type"] == "process"
            assert attempt["attributes"]["messaging.dj.attempt"] == 1
            assert attempt["attributes"]["messaging.destination.name"] == ("otel-bulk" if ids is copied else "default")
    # The job that the chained job enqueued: its enqueue ran inside the chained job's perform span
    # (in the worker), and it was performed in the same trace, under that enqueue.
    [[grandchild]] = performed.values()
    [inner_enqueue] = [s for s in spans if s["name"] == "dj enqueue"]
    [chain_perform] = [s for s in spans if s["name"] == "dj perform"
                       and s["attributes"]["messaging.message.id"] == str(chained)]
    assert inner_enqueue["parent_id"] == chain_perform["context"]["span_id"]
    assert grandchild["parent_id"] == inner_enqueue["context"]["span_id"]
    assert grandchild["context"]["trace_id"] == hex_trace(request)


def exception_of(span: dict) -> dict:
    [event] = [e for e in span["events"] if e["name"] == "exception"]
    return event["attributes"]


def test_errors_are_recorded_on_the_perform_span(otel, perform, conn):
    failing = tasks.fail.enqueue("f")
    permanent = tasks.permanent.enqueue("p")
    hang = tasks.hang.enqueue("h")
    async_fail = tasks.async_fail.enqueue("af")
    async_hang = tasks.async_hang.enqueue("ah")
    ok = tasks.ok.enqueue("ok")
    producers = {s.attributes["messaging.message.id"]: s for s in enqueue_spans(otel)}
    # A retry's wait is minutes long: run the first attempt, then bring the retry forward.
    performed, _ = perform()
    conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (failing,))
    performed_again, _ = perform()
    attempts = performed[str(failing)] + performed_again[str(failing)]

    # A raised exception: recorded as such, status ERROR, on each attempt; both attempts are
    # children of the one enqueue.
    assert [a["attributes"]["messaging.dj.attempt"] for a in attempts] == [1, 2]
    for a, dead in zip(attempts, [False, True]):
        assert a["parent_id"] == hex_span(producers[str(failing)])
        assert a["status"]["status_code"] == "ERROR"
        assert a["status"]["description"] == "ValueError: boom f"
        assert exception_of(a)["exception.type"] == "ValueError"
        assert exception_of(a)["exception.message"] == "boom f"
        assert "raise ValueError" in exception_of(a)["exception.stacktrace"]
        assert a["attributes"]["messaging.dj.dead"] is dead

    [p] = performed[str(permanent)]
    assert p["status"]["status_code"] == "ERROR"
    assert exception_of(p)["exception.type"] == "dj.errors.Permanent"
    assert p["attributes"]["messaging.dj.dead"] is True

    # Timeouts: a thread's attempt ends at its timeout (0.3 s), not when its thread returns (1.5 s).
    [h] = performed[str(hang)]
    assert exception_of(h)["exception.type"] == "TimeoutError"
    assert h["status"]["description"] == "timed out after 0.3 s"
    assert 0.25 < seconds(h) < 1.0
    [ah] = performed[str(async_hang)]
    assert exception_of(ah)["exception.type"] == "TimeoutError"
    assert 0.25 < seconds(ah) < 1.0

    [af] = performed[str(async_fail)]
    assert af["status"]["status_code"] == "ERROR"
    assert exception_of(af)["exception.type"] == "KeyError"

    [k] = performed[str(ok)]
    assert k["status"]["status_code"] == "UNSET" and not k["events"]


def seconds(span: dict) -> float:
    from datetime import datetime

    start, end = (datetime.fromisoformat(span[k].replace("Z", "+00:00")) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def test_without_a_configured_sdk_rows_carry_nothing_and_attempts_start_their_own_trace(monkeypatch, perform, conn):
    # opentelemetry-api alone, no tracer provider installed: no span, and no context to write down.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    monkeypatch.setattr(tracing, "_tracer", None)
    job_id = tasks.ok.enqueue("noop")
    assert conn.execute("SELECT trace_context FROM jobs WHERE id = %s", (job_id,)).fetchone()[0] is None
    # A row with garbage where a context should be is performed too, in a trace of its own.
    garbage = conn.execute("INSERT INTO jobs (task, args, trace_context) VALUES ('otel.ok', '[\"g\"]', "
                           "'\"not a context\"') RETURNING id").fetchone()[0]
    performed, _ = perform()
    for job_id in (job_id, garbage):
        [attempt] = performed[str(job_id)]
        assert attempt["parent_id"] is None
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_without_the_extra_dj_does_not_trace_at_all(db_url):
    """With opentelemetry not importable, the hooks are not there: enqueue is the plain method,
    the runner's execute is not wrapped, and a job is enqueued and run with nothing in the row."""
    script = r"""
import sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed
import dj
from dj import tracing
from dj.task import Enqueuer
from dj.worker.executor import AsyncExecutor, ThreadExecutor
assert tracing.ENABLED is False
assert not hasattr(Enqueuer.enqueue, "__wrapped__") and not hasattr(Enqueuer.enqueue_many_async, "__wrapped__")
from tests import support_tracing as tasks
ids = [tasks.ok.enqueue("plain"), *tasks.ok.enqueue_many([("p1",), ("p2",)])]
with dj.connection() as conn:
    assert conn.execute("SELECT count(*) FROM jobs WHERE trace_context IS NULL").fetchone()[0] == 3
worker = dj.Worker(concurrency=2)
assert "_execute" not in vars(worker._executor)
worker.run(burst=True)
assert worker.counts.succeeded == 3, worker.counts
assert "opentelemetry" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "DJ_DATABASE_URL": db_url, "DJ_TASKS": WORKER_TASKS})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_readme_example_joins_the_worker_to_the_requests_trace(db_url):
    """examples/otel_app.py, run as its docstring and the README say: two processes, one trace."""
    env = {**os.environ, "DJ_DATABASE_URL": db_url, "DJ_TASKS": "examples.otel_app"}
    spans = {}
    for command in (["-m", "examples.otel_app"], ["-m", "dj", "work", "--burst"]):
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120, cwd=ROOT,
                                env=env)
        assert result.returncode == 0, result.stderr
        decoder, text, at = json.JSONDecoder(), result.stdout, 0
        while (at := text.find("{", at)) != -1:  # ConsoleSpanExporter: one indented JSON object per span
            span, at = decoder.raw_decode(text, at)
            spans[span["name"]] = span
    checkout, enqueue, perform, inner = (spans[n] for n in ("checkout", "dj enqueue", "dj perform", "render receipt"))
    assert {s["context"]["trace_id"] for s in (enqueue, perform, inner)} == {checkout["context"]["trace_id"]}
    assert enqueue["parent_id"] == checkout["context"]["span_id"]
    assert perform["parent_id"] == enqueue["context"]["span_id"]
    assert inner["parent_id"] == perform["context"]["span_id"]
    assert perform["attributes"]["messaging.dj.task"] == "examples.send_receipt"
