"""Jobs for the reliability tests (tests/test_reliability_*.py).

Workers of those tests import this module as well as tests.support_jobs: start them with
`env=RELIABILITY_ENV`.
"""

from __future__ import annotations

import os
import threading
import time

import dj
from dj import job
from tests.support_jobs import _record

RELIABILITY_ENV = {"DJ_TASKS": "tests.support_jobs,tests.support_reliability"}


def open_gate(gate_dir, marker: str, attempt: int) -> None:
    """Let attempt `attempt` of the gated job `marker` go on."""
    with open(os.path.join(str(gate_dir), f"{marker}.{attempt}"), "w"):
        pass


def gate_passed(gate_dir, marker: str, attempt: int) -> bool:
    """Whether attempt `attempt` of the gated job `marker` went through its gate (it returns or
    raises right after)."""
    return os.path.exists(os.path.join(str(gate_dir), f"{marker}.{attempt}.done"))


def _wait_for_gate(gate_dir: str, marker: str, attempt: int, limit: float = 120.0) -> None:
    path = os.path.join(gate_dir, f"{marker}.{attempt}")
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.02)


def _gated(marker: str, gate_dir: str, fail_on: list[int]) -> None:
    attempt = dj.current_job().attempt
    _record(f"{marker}:start")
    # No database work after the gate: in the partition test the link may still be down.
    _wait_for_gate(gate_dir, marker, attempt)
    with open(os.path.join(gate_dir, f"{marker}.{attempt}.done"), "w"):
        pass
    if attempt in fail_on:
        raise RuntimeError(f"{marker} failed in attempt {attempt}")


@job(name="rel.gated")
def gated(marker: str, gate_dir: str, fail_on: list[int] = ()) -> None:
    """Record the start, wait until the test opens gate `<marker>.<attempt>`, leave a file saying so,
    then fail if the attempt is in `fail_on`, else succeed. The test decides when each attempt ends
    and how."""
    _gated(marker, gate_dir, list(fail_on))


@job(name="rel.gated_timeout", timeout=1)
def gated_timeout(marker: str, gate_dir: str, fail_on: list[int] = ()) -> None:
    """`rel.gated` with a 1 s timeout."""
    _gated(marker, gate_dir, list(fail_on))


@job(name="rel.stuck_first_attempt", timeout=1)
def stuck_first_attempt(marker: str, seconds: float = 120.0) -> None:
    """Attempt 1 hangs far past the 1 s timeout; later attempts record and succeed."""
    if dj.current_job().attempt == 1:
        time.sleep(seconds)
    _record(marker)


# --- hostile jobs --------------------------------------------------------------------------------

class Unpicklable(Exception):
    """Holds a lock and refuses to be pickled, like many real exceptions of C libraries."""

    def __init__(self):
        super().__init__("an exception that cannot be pickled")
        self.lock = threading.Lock()

    def __reduce__(self):
        raise TypeError("Unpicklable cannot be pickled")


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("__str__ refuses")

    def __repr__(self):
        raise RuntimeError("__repr__ refuses")


@job(name="rel.raise_unpicklable", max_attempts=1)
def raise_unpicklable() -> None:
    raise Unpicklable()


@job(name="rel.raise_unprintable", max_attempts=1)
def raise_unprintable() -> None:
    raise Unprintable()


@job(name="rel.raise_enormous", max_attempts=1)
def raise_enormous(megabytes: int) -> None:
    raise ValueError("enormous " + "x" * (megabytes * 1_000_000))


@job(name="rel.raise_bad_text", max_attempts=1)
def raise_bad_text() -> None:
    # A lone surrogate cannot be encoded for PostgreSQL, and text cannot hold NUL.
    raise ValueError("bad text \ud800 and \x00 inside")


@job(name="rel.size")
def size(data) -> None:
    _record(f"size:{len(data)}")
