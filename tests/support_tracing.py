"""Jobs for tests/test_tracing.py. A worker that imports this module (through DJ_TASKS) with
DJ_TEST_SPANS set configures the OpenTelemetry SDK to write each finished span, as one JSON line,
to a file of its own process in that directory, where the test reads them."""

import asyncio
import os
import time

import dj
from dj import job

SPANS_DIR = os.environ.get("DJ_TEST_SPANS")
if SPANS_DIR:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    _out = open(os.path.join(SPANS_DIR, f"{os.getpid()}.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
        out=_out, formatter=lambda span: span.to_json(indent=None) + "\n")))
    trace.set_tracer_provider(_provider)


@job(name="otel.ok")
def ok(marker) -> None:
    pass


@job(name="otel.chain")
def chain(marker) -> None:
    """Enqueues another job from inside its own: that enqueue nests under this attempt's span."""
    ok.enqueue(f"{marker}:next")


@job(name="otel.fail", max_attempts=2)
def fail(marker) -> None:
    raise ValueError(f"boom {marker}")


@job(name="otel.permanent", max_attempts=5)
def permanent(marker) -> None:
    raise dj.Permanent(f"never {marker}")


@job(name="otel.hang", timeout=0.3, max_attempts=1)
def hang(marker) -> None:
    time.sleep(1.5)


@job(name="otel.async_ok")
async def async_ok(marker) -> None:
    await asyncio.sleep(0)


@job(name="otel.async_fail", max_attempts=1)
async def async_fail(marker) -> None:
    await asyncio.sleep(0)
    raise KeyError(marker)


@job(name="otel.async_hang", timeout=0.3, max_attempts=1)
async def async_hang(marker) -> None:
    await asyncio.sleep(30)
