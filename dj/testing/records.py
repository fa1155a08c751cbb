"""The test mode's records of enqueued jobs, and how tests pick them out (filter, assertions)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import task as _task

ANY: Any = object()  # "not given" for the matchers' keyword arguments


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(eq=False)
class CapturedJob:
    """One enqueued job, as the worker would have claimed it."""

    id: int
    task: str
    args: list[Any]  # as the worker would pass them: after a round trip through JSON
    kwargs: dict[str, Any]
    queue: str
    priority: int
    run_at: datetime  # when it may run; the moment of the enqueue when none was given
    enqueued_at: datetime
    max_attempts: int = 25
    timeout: float | None = None
    unique_key: str | None = None
    batch_id: int | None = None
    progress: list[tuple[float, str]] = field(default_factory=list)  # what current_job().progress() reported
    error: BaseException | None = None  # what it raised, for a job in `failed`
    keep: float | None = None  # seconds its success is kept (keep=); None: not kept
    result: Any = None  # what it returned, after a round trip through JSON (for dj.result())
    after: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # after=: (job ids, batch ids) it waits for

    @property
    def scheduled(self) -> bool:
        """Whether it was enqueued to run later (run_at more than a second after the enqueue)."""
        return self.run_at - self.enqueued_at > timedelta(seconds=1)

    def __repr__(self) -> str:
        extra = f" run_at={self.run_at.isoformat()}" if self.scheduled else ""
        return (f"<job {self.id} {self.task} args={self.args!r} kwargs={self.kwargs!r} queue={self.queue!r} "
                f"priority={self.priority}{extra}>")


def task_name(task: Any) -> str:
    return task.name if isinstance(task, _task.Enqueuer) else str(task)




def aware(moment: datetime) -> datetime:
    if not isinstance(moment, datetime):
        raise TypeError(f"run_at must be a datetime, not {type(moment).__name__}")
    return moment if moment.tzinfo is not None else moment.astimezone()  # naive: local time


def matching(records: list[CapturedJob], task: Any, fields: dict[str, Any]) -> list[CapturedJob]:
    fields = dict(fields)
    tolerance = fields.pop("tolerance", timedelta(seconds=1))
    expected: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in CapturedJob.__dataclass_fields__ and name != "scheduled":
            raise TypeError(f"a captured job has no field {name!r}")
        if name in ("args", "kwargs") and not callable(value):
            value = json.loads(_task.to_json(list(value) if name == "args" else value, name))
        expected[name] = value
    if task is not ANY:
        expected["task"] = task_name(task)
    return [r for r in list(records) if all(field_matches(r, n, v, tolerance) for n, v in expected.items())]


def field_matches(record: CapturedJob, name: str, expected: Any, tolerance: timedelta) -> bool:
    actual = getattr(record, name)
    if name == "run_at" and not callable(expected):
        if expected is None:
            return not record.scheduled
        if isinstance(expected, timedelta):
            return abs(record.run_at - record.enqueued_at - expected) <= tolerance
        return abs(record.run_at - aware(expected)) <= tolerance
    if callable(expected) and name != "task":
        return bool(expected(actual))
    return bool(actual == expected)


def positive(count: int | None) -> int | None:
    if count is not None and count < 1:
        raise ValueError("count must be at least 1 (for none, use assert_not_enqueued)")
    return count


def assert_matches(records: list[CapturedJob], what: str, task: Any, count: int | None,
                    fields: dict[str, Any]) -> list[CapturedJob]:
    """The matching records, if there are `count` of them (None: at least one); else AssertionError."""
    found = matching(records, task, fields)
    if (count is None and found) or (count is not None and len(found) == count):
        return found
    wanted = ", ".join([*([f"task={task_name(task)!r}"] if task is not ANY else []),
                        *(f"{k}={v!r}" for k, v in fields.items())]) or "any job"
    listing = "\n".join(f"  {r!r}" for r in records) or "  (none)"
    expected = "at least one" if count is None else str(count)
    raise AssertionError(f"expected {expected} {what} job(s) matching {wanted}, found {len(found)}; "
                         f"{what}:\n{listing}")
