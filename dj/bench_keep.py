"""`dj bench`'s keep section: the 2-process drain of no-op jobs enqueued with keep= (each success
moved to job_results with its return value, sql.COMPLETE_KEEP) against the same drain without keep
(each success deleted, sql.COMPLETE).

Both run on the same worker pool and queue, alternating, KEEP_ROUNDS of each after a warm-up, so that a
change of load on the machine hits both alike; the ratio is of their medians. The kept rows are not
pruned during the run (keep is an hour), so later rounds drain beside the history of the earlier
ones: a drain that slowed as kept rows piled up would show in the rounds.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bench import _Bench

PROCESSES = 2
GOAL = 0.7  # of the drain without keep, in the same run
KEEP_SECONDS = 3600
# More rounds than the other drains (ROUNDS), and longer ones: a ratio of two noisy medians needs
# them. Rounds of 10k jobs (a quarter of a second) gave ratios from 0.58 to 0.98 on one machine.
KEEP_ROUNDS = 5
ROUND_JOBS = 50_000


def round_jobs(bench: "_Bench") -> int:
    """Jobs per round; with --quick, a check that it works, not a figure."""
    return min(bench.jobs, 1000) if bench.quick else max(bench.jobs, ROUND_JOBS)


def measure(bench: "_Bench") -> dict[str, Any]:
    from .bench import _WorkerPool, noop

    q = bench.queue(f"keep{PROCESSES}")
    n = round_jobs(bench)

    def fill_and_drain(pool: _WorkerPool, keep: float | None) -> float:
        noop.using(queue=q, keep=keep).enqueue_many([()] * n)
        return bench.timed_drain(pool, q, n)

    with _WorkerPool(bench.url, [q], PROCESSES) as pool:
        noop.using(queue=q, keep=KEEP_SECONDS).enqueue_many([()] * min(bench.jobs, 500))  # warm-up, both paths
        noop.using(queue=q).enqueue_many([()] * min(bench.jobs, 500))
        bench.wait_empty(pool, q, 1000)
        off, on = [], []
        for _ in range(1 if bench.quick else KEEP_ROUNDS):
            off.append(fill_and_drain(pool, None))
            on.append(fill_and_drain(pool, KEEP_SECONDS))
    kept = bench.conn.execute("SELECT count(*) FROM job_results WHERE queue = %s", (q,)).fetchone()[0]
    bench.conn.execute("DELETE FROM job_results WHERE queue = %s", (q,))
    per_s, off_per_s = statistics.median(on), statistics.median(off)
    return {"processes": PROCESSES, "per_s": per_s, "off_per_s": off_per_s, "ratio": per_s / off_per_s,
            "kept_rows": kept, "rounds": {"keep": on, "off": off}}


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's row in `dj bench`'s table."""
    k = doc.get("keep")
    if not k:
        return
    t.add_row(f"drain with keep=, {k['processes']} processes ({k['kept_rows']:,} kept)", n(k["per_s"]),
              f">= {GOAL:.0%} of the drain without keep, run alternately ({n(k['off_per_s'])}): {k['ratio']:.0%}",
              mark(k["ratio"] >= GOAL))
