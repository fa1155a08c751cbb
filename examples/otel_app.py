"""dj with OpenTelemetry (the extra dj[otel]): a job's `dj perform` span, in the worker, belongs to
the trace of the request that enqueued it.

    pip install 'djq[otel]' opentelemetry-sdk
    DJ_TASKS=examples.otel_app python -m examples.otel_app   # a "checkout" span enqueues the job
    DJ_TASKS=examples.otel_app dj work --burst               # performs it, in the checkout's trace

Each process prints its spans (ConsoleSpanExporter) as JSON: the `dj perform` span has the trace_id
of "checkout", and its parent_id is the span id of `dj enqueue`. In an application, swap the
console exporter for OTLP (opentelemetry-exporter-otlp) and the spans go to Jaeger, Tempo,
Honeycomb...
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from dj import job

# Configured at import: the web app imports this module, and so does every worker process (DJ_TASKS).
provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
trace.set_tracer_provider(provider)
tracer = trace.get_tracer("shop")


@job(name="examples.send_receipt")
def send_receipt(order_id: int) -> None:
    with tracer.start_as_current_span("render receipt"):  # nests under the job's `dj perform` span
        pass


if __name__ == "__main__":
    with tracer.start_as_current_span("checkout"):
        send_receipt.enqueue(42)
