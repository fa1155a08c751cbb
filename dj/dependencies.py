"""Job dependencies: `task.using(after=[job_id, batch, ...]).enqueue(...)` runs the job once every
listed job and batch has succeeded, and kills it (down the chain) if one dies or is cancelled.

The statements are in dj/sql.py (ENQUEUE_AFTER, and the `settled` step of COMPLETE, FAIL, CANCEL,
CLOSE_BATCH and the reapers) and the function they call in migration 0009; docs/ARCHITECTURE.md
("Dependencies") gives the design and its invariants. This module turns `after=` into ids, and
answers what a job waits for (`dj jobs show`, the dashboard) and whether a burst worker must wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import psycopg

from .batches import Batch, current_batch


class BatchRef(NamedTuple):
    """A batch named by its id, for `after=`: `after=[dj.BatchRef(7)]`. Job ids and batch ids are
    separate sequences, so a bare int in `after=` is always a job id; a batch is passed as the
    `dj.Batch` that `with dj.batch(...) as b` gave, or as a BatchRef when only its id is at hand."""
    id: int


After = tuple[tuple[int, ...], tuple[int, ...]]  # (job ids, batch ids)


def split(after: Iterable[Any]) -> After:
    """`after=` as (job ids, batch ids), checked: a TypeError for anything else, a ValueError for
    a batch that is still open around this enqueue (the job would join it and wait for itself)."""
    if isinstance(after, (str, bytes, int, Batch, BatchRef)):
        raise TypeError("after= takes a list of job ids and batches, e.g. after=[job_id, batch]")
    jobs: list[int] = []
    batches: list[int] = []
    for item in after:
        if isinstance(item, bool) or not isinstance(item, (int, Batch, BatchRef)):
            raise TypeError(f"after= items are job ids (int), dj.Batch or dj.BatchRef, not {item!r}")
        if isinstance(item, int):
            jobs.append(item)
            continue
        if item.id is None:
            raise ValueError("after= got a dj.Batch that has not been opened yet (use it after `with`)")
        if isinstance(item, Batch) and item is current_batch():
            raise ValueError("a job cannot wait for the batch it is enqueued into")
        batches.append(item.id)
    return tuple(dict.fromkeys(jobs)), tuple(dict.fromkeys(batches))


class UnknownDependency(LookupError):
    """An after= id names no job or batch that ever existed."""


# What a job waits for: the jobs and batches it still has rows for.
_WAITS_FOR = """
SELECT x.after_job, x.after_batch,
       CASE WHEN x.after_job IS NOT NULL THEN
           (SELECT CASE WHEN j.failed_at IS NOT NULL THEN 'dead' WHEN j.locked_by IS NOT NULL THEN 'running'
                        WHEN j.run_at = 'infinity' THEN 'waiting' WHEN j.run_at > now() THEN 'scheduled'
                        ELSE 'ready' END
            FROM jobs j WHERE j.id = x.after_job)
       ELSE (SELECT CASE WHEN b.finished_at IS NOT NULL THEN 'finished' ELSE 'running' END
             FROM batches b WHERE b.id = x.after_batch) END AS state
FROM job_dependencies x WHERE x.job_id = %s ORDER BY x.after_job NULLS LAST, x.after_batch
"""


def waits_for(conn: psycopg.Connection[Any], job_id: int) -> list[dict[str, Any]]:
    """What job `job_id` still waits for: [{"job": id} or {"batch": id}, with its "state"]."""
    return [({"job": j} if j is not None else {"batch": b}) | {"state": state}
            for j, b, state in conn.execute(_WAITS_FOR, (job_id,)).fetchall()]


# Whether a job waiting in these queues could still be released by work that is under way: one of
# the jobs it waits for, directly or through other waiting jobs and batches, is ready or running
# (in any queue, as another worker may run it). A burst worker keeps going while this holds. A
# dependency that is only scheduled (a retry in backoff) does not hold it, as a scheduled job in
# its own queues does not: --burst stops once nothing can run now. It runs only when a burst worker
# found nothing to claim, at most once per wake-up or poll interval.
RELEASABLE = """
WITH RECURSIVE held(id) AS (
    SELECT id FROM jobs
    WHERE queue = ANY(%s) AND run_at = 'infinity' AND failed_at IS NULL AND locked_by IS NULL
    UNION
    SELECT j.id
    FROM held h
    JOIN job_dependencies x ON x.job_id = h.id
    CROSS JOIN LATERAL (
        SELECT id FROM jobs WHERE id = x.after_job AND failed_at IS NULL  -- the primary key
        UNION ALL
        SELECT id FROM jobs WHERE batch_id = x.after_batch AND failed_at IS NULL
    ) AS j
)
SELECT EXISTS (
    SELECT FROM held h JOIN jobs j ON j.id = h.id
    WHERE j.locked_by IS NOT NULL OR j.run_at <= now()
)
"""


# Whether any job waits in these queues (jobs_waiting_idx): nearly always not, and then the walk
# above need not be planned at all.
ANY_WAITING = """
SELECT EXISTS (SELECT FROM jobs WHERE queue = ANY(%s) AND run_at = 'infinity' AND failed_at IS NULL
                                  AND locked_by IS NULL)
"""


def releasable(conn: psycopg.Connection[Any], queues: list[str]) -> bool:
    if not conn.execute(ANY_WAITING, (queues,)).fetchone()[0]:  # type: ignore[index]
        return False
    with conn.transaction():
        # The walk's estimated cost (a scan of jobs per batch it meets) is above a stock server's
        # jit_above_cost, and JIT compiled it on every call: 0.55 s of a 0.6 s call on PostgreSQL
        # 15 at the end of a 50k-job drain. Off for this transaction only (safe behind a pooler).
        conn.execute("SELECT set_config('jit', 'off', true)")
        return bool(conn.execute(RELEASABLE, (queues,)).fetchone()[0])  # type: ignore[index]
