"""`dj bench`'s async drain (part of the drain section): the 2-process drain of no-op coroutine jobs, against the sync drain.

The same `dj work` (default flags) serves both kinds; the async jobs run on each process's event
loop. Sync and async drains alternate, ROUNDS of each after a warm-up, on two worker pools that
are both up, so that a change of load on the machine hits both alike; the ratio is of their medians.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .task import job

if TYPE_CHECKING:
    from .bench import _Bench, _WorkerPool

PROCESSES = 2
GOAL = 0.5  # of the sync drain in the same run


@job(name="dj.bench.async_noop")
async def async_noop(*args: Any, **kwargs: Any) -> None:
    """Does nothing, on the worker's event loop."""


def measure(bench: "_Bench", sync_pool: "_WorkerPool", sync_queue: str) -> dict[str, Any]:
    from .bench import ROUNDS, _WorkerPool

    q = bench.queue(f"async{PROCESSES}")

    def fill_and_drain(n: int) -> float:
        async_noop.using(queue=q).enqueue_many([()] * n)
        return bench.timed_drain(pool, q, n)

    with _WorkerPool(bench.url, [q], PROCESSES) as pool:
        fill_and_drain(min(bench.jobs, 500))  # warm-up: the loops start with the first async job
        sync, coroutines = [], []
        for _ in range(ROUNDS):
            sync.append(bench.fill_and_drain(sync_pool, sync_queue, bench.jobs))
            coroutines.append(fill_and_drain(bench.jobs))
    per_s, sync_per_s = statistics.median(coroutines), statistics.median(sync)
    return {"processes": PROCESSES, "per_s": per_s, "sync_per_s": sync_per_s, "ratio": per_s / sync_per_s,
            "rounds": {"async": coroutines, "sync": sync}}


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's row in `dj bench`'s table, after the drains."""
    a = doc.get("drain_async")
    if not a:
        return
    t.add_row(f"drain of async no-op jobs, {a['processes']} processes", n(a["per_s"]),
              f">= {GOAL:.0%} of the sync drain run alternately ({n(a['sync_per_s'])}): {a['ratio']:.0%}",
              mark(a["ratio"] >= GOAL))
