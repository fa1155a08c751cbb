"""Jobs with per-key limits, for tests/test_key_limits.py. Workers import this module when the
tests add it to DJ_TASKS; other tests' workers do not, so they claim as they always did."""

import time

from dj import job
from tests.support_jobs import _record


@job(name="keys.one", limit_by=lambda tenant, marker, seconds=0.0: tenant, limit=1)
def one(tenant: str, marker: str, seconds: float = 0.0) -> None:
    """At most one per tenant at a time: records its start and end."""
    _record(f"{tenant}:{marker}:start")
    time.sleep(seconds)
    _record(f"{tenant}:{marker}:end")


@job(name="keys.three", limit_by=lambda tenant, marker, seconds=0.0: tenant, limit=3)
def three(tenant: str, marker: str, seconds: float = 0.0) -> None:
    """At most three per tenant at a time."""
    _record(f"{tenant}:{marker}:start")
    time.sleep(seconds)
    _record(f"{tenant}:{marker}:end")


@job(name="keys.fail_first", limit_by=lambda tenant, marker: tenant, limit=1, max_attempts=2)
def fail_first(tenant: str, marker: str) -> None:
    import dj

    _record(f"{tenant}:{marker}:start")
    if dj.current_job().attempt == 1:
        raise RuntimeError("first attempt fails")
    _record(f"{tenant}:{marker}:end")


@job(name="keys.hang_first", limit_by=lambda tenant, marker: tenant, limit=1)
def hang_first(tenant: str, marker: str) -> None:
    """The job with marker "first" hangs on its first attempt (until its worker is killed); every
    other attempt returns at once."""
    import dj

    _record(f"{tenant}:{marker}:start")
    if marker == "first" and dj.current_job().attempt == 1:
        time.sleep(120)
    _record(f"{tenant}:{marker}:end")
