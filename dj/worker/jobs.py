"""What the worker's parts pass between them: a claimed job, an attempt's outcome, the counts; and
the small pure helpers around them (argument decoding, error text, SQL array literals)."""

from __future__ import annotations

import json
import logging
import random
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..results import encode_result
from ..task import MAX_ARGS_BYTES

log = logging.getLogger("dj.worker")

MAX_ERROR_CHARS = 20_000
# PostgreSQL prints jsonb with a space after each ',' and ':', so a row that passed enqueue's limit
# can come back up to about twice as long.
MAX_CLAIMED_ARGS_BYTES = 2 * MAX_ARGS_BYTES


def retry_delay(attempts: int) -> float:
    """DelayedJob's backoff, attempts**4 + 5 seconds, plus up to 10% jitter so retries spread out."""
    base = attempts**4 + 5
    return base + random.uniform(0, base * 0.1)


@dataclass(slots=True)
class Claimed:
    id: int
    task: str
    args: Any
    kwargs: Any
    attempts: int
    max_attempts: int
    timeout: float | None
    queue: str
    priority: int
    run_at: int  # microseconds since the epoch, exact: the claim order and the claim's position need it
    keep: float | None = None  # seconds to keep a success (with its return value); None: deleted
    started: float | None = field(default=None)
    finished: bool = field(default=False)
    trace_context: str | None = field(default=None)  # the enqueue's span context, JSON (dj/tracing.py)
    span: Any = field(default=None)  # the attempt's `dj perform` span and its start, while it runs


@dataclass
class Outcome:
    job: Claimed
    error: str | None = None  # None means success
    dead: bool = False
    seconds: float = 0.0  # how long the attempt ran
    exc: BaseException | None = None  # what the job raised, for its span (dj/tracing.py)
    # A kept job's success (job.keep set): its return value as JSON, or None and why it is not kept.
    result: str | None = None
    result_error: str | None = None


@dataclass
class Counts:
    succeeded: int = 0
    failed: int = 0
    dead: int = 0


class _Undecodable:
    """Stands in for a job's args or kwargs that the worker refuses to decode; the job goes dead."""

    def __init__(self, reason: str):
        self.reason = reason


def _load_job_json(data: str) -> Any:
    """json.loads for a claimed job's args or kwargs: a row written by hand with enormous or
    absurdly nested JSON must fail that job, not the claim of a batch.

    The claim returns them as text and they are decoded here, not by a psycopg loader: a loader
    is a Python call per column, and with the run_at datetime it was most of the claim's cost
    per job on the worker's side (2.2 us a row against 0.9)."""
    if data == "[]":  # most jobs: skip the decoder
        return []
    if data == "{}":
        return {}
    if len(data) > MAX_CLAIMED_ARGS_BYTES:
        return _Undecodable(f"arguments too large: {len(data) / 1e6:.1f} MB of JSON; the limit is "
                            f"{MAX_ARGS_BYTES / 1e6:g} MB")
    try:
        return json.loads(data)
    except (RecursionError, ValueError) as exc:
        return _Undecodable(f"arguments could not be decoded: {_clip(str(exc), 200)}")


def malformed(job: Claimed) -> str | None:
    """Why a claimed job cannot be called (its arguments), or None. Callers check first that args
    is a list and kwargs a dict, the common case, and call this only when one is not."""
    for value in (job.args, job.kwargs):
        if isinstance(value, _Undecodable):
            return f"malformed job: {value.reason}"
    if not isinstance(job.args, list) or not isinstance(job.kwargs, dict):
        return "malformed job: args must be a JSON array and kwargs a JSON object"
    return None


def unknown_task(job: Claimed) -> Outcome:
    return Outcome(job, f"unknown task {job.task!r}: no @job with this name is registered", dead=True)


def log_job(job: Claimed, outcome: Outcome | None) -> None:
    """One event per job start and end (`dj work --verbose` or `--log-format json`)."""
    if outcome is None:
        event, level = "job_started", logging.INFO
    elif outcome.error is None:
        event, level = "job_succeeded", logging.INFO
    else:
        event, level = ("job_dead", logging.WARNING) if outcome.dead else ("job_failed", logging.WARNING)
    fields = {"event": event, "job_id": job.id, "task": job.task, "queue": job.queue, "attempt": job.attempts}
    if outcome is not None:
        fields["duration_s"] = round(time.monotonic() - job.started, 6)
        if outcome.error is not None:
            lines = outcome.error.strip().splitlines()
            fields["error"] = lines[-1] if lines else ""
    log.log(level, "%s %d %s (attempt %d)%s", event.replace("_", " "), job.id, job.task, job.attempts,
            f" in {fields['duration_s']:.3f}s" if "duration_s" in fields else "", extra=fields)


def _describe(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:  # noqa: BLE001 - a hostile __str__ or __repr__
        text = f"{type(exc).__name__} (its message could not be formatted)"
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS // 2] + "\n...[truncated]...\n" + text[-MAX_ERROR_CHARS // 2:]
    text = text.replace("\x00", "\\0")  # PostgreSQL text cannot hold NUL
    # nor lone surrogates, which would fail the whole batch's round trip (UnicodeEncodeError)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _array_literal(numbers: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers, for a parameter the statement casts (`%s::bigint[]`):
    psycopg adapts a list element by element in Python, a fifth of the worker's time in a drain."""
    return "{" + ",".join(map(repr, numbers)) + "}"


def _seconds_literal(seconds: Iterable[float]) -> str:
    """Like _array_literal, to the microsecond: repr() of a float costs three times as much."""
    return "{" + ",".join(["%.6f" % x for x in seconds]) + "}"


def _clip(text: str, limit: int) -> str:
    """At most `limit` characters of text that may come from a job or the database, for a log line."""
    return text if len(text) <= limit else text[:limit] + f"...[{len(text) - limit} more]"


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


def kept_outcome(job: Claimed, value: Any) -> Outcome:
    """The success of a kept job, with its return value as JSON. A value that is not JSON or is over
    the arguments' size limit does not fail the job (its work is done, and a retry would do it
    again): the job succeeds, the reason is kept instead of the value (dj.result() raises
    dj.ResultError with it), and the worker logs a warning."""
    result, error = encode_result(value)
    if error is not None:
        log.warning("job %d (%s) succeeded, but its return value is not kept: %s", job.id, _clip(job.task, 200),
                    error, extra={"event": "result_not_kept", "job_id": job.id, "task": job.task})
    return Outcome(job, result=result, result_error=error)
