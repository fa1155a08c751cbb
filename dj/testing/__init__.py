"""Test mode: jobs enqueued in memory, with no database.

    with dj.testing.capture() as jobs:      # every enqueue is recorded; nothing is written anywhere
        signup("a@b.c")
        jobs.assert_enqueued(send_welcome, args=["a@b.c"])
        jobs.drain()                         # runs them here, with the jobs they enqueue
    with dj.testing.inline():                # every enqueue runs the job at once, in the caller

Both divert dj.task's one seam, `_interceptor`, through which every enqueue path goes (sync and
async, single and many, with or without `conn=`), and dj.batches' `_recorder`. An enqueue is
validated as in production (JSON arguments, their size, the priority, unique keys) before it is
recorded, so a test fails where production would.

The mode is process-wide, like the database it stands in for: an enqueue from any thread (a web
app's request thread, say) goes to the innermost active capture or inline block. Blocks nest; the
inner one receives the enqueues until it exits, and they must exit in the reverse order of entry.
"""

from __future__ import annotations

from .jobs import Jobs
from .records import CapturedJob

__all__ = ["CapturedJob", "Jobs", "capture", "inline"]


def capture() -> Jobs:
    """Record every enqueue in memory instead of writing it; see the module's docstring."""
    return Jobs()


def inline() -> Jobs:
    """Run every enqueued job at once, in the caller; its exception propagates. The jobs it
    enqueues run at once too, and a batch's callback runs when the batch closes."""
    return Jobs(run_at_once=True)
