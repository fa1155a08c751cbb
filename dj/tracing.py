"""OpenTelemetry spans for enqueues and attempts: the optional extra `dj[otel]` (opentelemetry-api).

Whether dj traces is decided once, when this module is imported: ENABLED is whether the API can be
imported. Without it, `enqueuing` hands back the method itself and every other hook sits behind one
test of ENABLED, so a dj without the extra pays nothing per job and writes nothing more per row.
With the API and no tracer provider installed (no SDK configured), dj makes no spans (it looks for
a provider at most once a second: `_active_tracer`). A row then carries a span
context only where the caller's is valid (one propagated from upstream), so nothing is written
either.

- `dj enqueue` (kind PRODUCER) spans each enqueue call: sync or async, one job or many, on dj's
  connection or a caller's `conn=`. Its context, as the global propagator writes it (W3C
  traceparent by default), goes into the new rows' `trace_context` column, as JSON; NULL where no
  span context is valid.
- `dj perform` (kind CONSUMER) spans each attempt: a child of the context read from the row, so a
  job belongs to the trace that enqueued it, across processes, and every attempt of a retried job
  hangs under the same enqueue. It is current while the job runs, so the job's own spans and the
  jobs it enqueues nest under it. It ends when the worker records the attempt's outcome
  (`finished`, from the producer's cycle), with the attempt's own end time: a thread's attempt
  that timed out ends at its timeout, whatever its thread does later, since that is when dj
  failed it.

Attributes follow OpenTelemetry's messaging conventions: messaging.system "dj",
messaging.destination.name (the queue), messaging.message.id (the job id), messaging.operation.*,
messaging.batch.message_count for enqueue_many; dj's own under messaging.dj.* (task, attempt).
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import DJError

if TYPE_CHECKING:
    from .worker.jobs import Claimed, Outcome

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, StatusCode
except ImportError:  # the extra is not installed
    ENABLED = False
else:
    ENABLED = True

F = TypeVar("F", bound=Callable[..., Any])

ENQUEUE_SPAN = "dj enqueue"
PERFORM_SPAN = "dj perform"
SYSTEM = "dj"


# dj's tracer, from the provider the application installs (an SDK's), once it has installed one.
_tracer: Any = None
_look_again_at = 0.0
LOOK_EVERY = 1.0


def _active_tracer(look: bool = False) -> Any:
    """dj's tracer, or None while no tracer provider is installed. Then there are no spans to
    record, and dj makes none: a no-op span costs a few microseconds, and the look at the global
    provider (an environment variable, an isinstance of an ABC) about 1 us, so that look is taken
    at most once a second. An application installs its provider at start, before it enqueues."""
    global _tracer, _look_again_at
    if _tracer is None:
        now = time.monotonic()
        if now < _look_again_at and not look:
            return None
        _look_again_at = now + LOOK_EVERY
        provider = trace.get_tracer_provider()
        if isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
            return None
        _tracer = provider.get_tracer("dj")  # a provider is installed once per process, for good
    return _tracer


def enqueuing(method: F) -> F:
    """Span an Enqueuer method (enqueue, enqueue_many, or their async twins) with `dj enqueue`;
    without OpenTelemetry, the method itself."""
    if not ENABLED:
        return method
    many = method.__name__.startswith("enqueue_many")
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def traced_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            tracer = _tracer or _active_tracer()
            if tracer is None:
                return await method(self, *args, **kwargs)
            with tracer.start_as_current_span(ENQUEUE_SPAN, kind=SpanKind.PRODUCER,
                                              attributes=_enqueue_attributes(self)) as span:
                result = await method(self, *args, **kwargs)
                _enqueued(span, result, many)
                return result
        return traced_async  # type: ignore[return-value]

    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        tracer = _tracer or _active_tracer()
        if tracer is None:
            return method(self, *args, **kwargs)
        with tracer.start_as_current_span(ENQUEUE_SPAN, kind=SpanKind.PRODUCER,
                                          attributes=_enqueue_attributes(self)) as span:
            result = method(self, *args, **kwargs)
            _enqueued(span, result, many)
            return result
    return traced  # type: ignore[return-value]


def _enqueue_attributes(enqueuer: Any) -> dict[str, Any]:
    return {"messaging.system": SYSTEM, "messaging.operation.type": "send", "messaging.operation.name": "enqueue",
            "messaging.destination.name": enqueuer.options.queue, "messaging.dj.task": enqueuer.name}


def _enqueued(span: Any, result: Any, many: bool) -> None:
    if not span.is_recording():
        return
    if many:
        span.set_attribute("messaging.batch.message_count", len(result))
    else:
        span.set_attribute("messaging.message.id", str(result))


def carrier() -> str | None:
    """The current span context as the row's trace_context (JSON of the propagator's fields), or
    None where there is no valid one to pass on. Called only when ENABLED."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    fields: dict[str, str] = {}
    propagate.inject(fields)
    return json.dumps(fields, separators=(",", ":")) if fields else None


# --- the worker's side ------------------------------------------------------------------------------


def _parent(job: Claimed) -> Any:
    """The context the row carries (None, the current one, where it carries none or garbage)."""
    if job.trace_context is None:
        return None
    try:
        fields = json.loads(job.trace_context)
    except ValueError:
        return None
    return propagate.extract(fields) if isinstance(fields, dict) else None


def _start(tracer: Any, job: Claimed) -> Any:
    start = time.time_ns()
    span = tracer.start_span(PERFORM_SPAN, context=_parent(job), kind=SpanKind.CONSUMER, start_time=start,
                              attributes={
                                  "messaging.system": SYSTEM, "messaging.operation.type": "process",
                                  "messaging.operation.name": "perform", "messaging.destination.name": job.queue,
                                  "messaging.message.id": str(job.id), "messaging.dj.task": job.task,
                                  "messaging.dj.attempt": job.attempts})
    job.span = (span, start)
    return otel_context.attach(trace.set_span_in_context(span))


def performing(execute: Callable[[Claimed], Outcome]) -> Callable[[Claimed], Outcome]:
    """A runner thread's execute, with the attempt's `dj perform` span current while it runs (the
    span ends in `finished`); `execute` itself where no tracer provider is installed. Decided when
    the executor starts, after the worker imported the task modules (where an application installs
    its provider, as in examples/otel_app.py), so a worker without one pays nothing per job."""
    tracer = _active_tracer(look=True)
    if tracer is None:
        return execute

    @functools.wraps(execute)
    def traced(job: Claimed) -> Outcome:
        token = _start(tracer, job)
        try:
            return execute(job)
        finally:
            otel_context.detach(token)
    return traced


def performing_async(execute: Callable[[Claimed], Any]) -> Callable[[Claimed], Any]:
    """The event loop's execute, as `performing` (the context is the runner task's own)."""
    tracer = _active_tracer(look=True)
    if tracer is None:
        return execute

    @functools.wraps(execute)
    async def traced(job: Claimed) -> Outcome:
        token = _start(tracer, job)
        try:
            return await execute(job)  # type: ignore[no-any-return]
        finally:
            otel_context.detach(token)
    return traced


def finished(outcomes: Iterable[Outcome]) -> None:
    """End the spans of recorded attempts: status, the error (the exception itself where the job
    raised one; a TimeoutError or DJError for what dj decided), and the attempt's end time."""
    for o in outcomes:
        job = o.job
        if job.span is None:
            continue
        span, start = job.span
        job.span = None
        if o.error is not None:  # a success leaves the status unset, as the conventions ask of libraries
            lines = o.error.strip().splitlines()
            last = lines[-1] if lines else "error"
            # The job's own exception; else dj failed the attempt itself (a timeout, an unknown task).
            exc = o.exc if o.exc is not None else (
                TimeoutError(last) if last.startswith("timed out after") else DJError(last))
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, last[:500])
            span.set_attribute("messaging.dj.dead", o.dead)
        span.end(end_time=start + int(o.seconds * 1e9))
