"""`dj bench`'s old-snapshot section: a drain while another session holds a snapshot open.

A report, a `pg_dump` or an application connection left idle in a transaction keeps a snapshot,
and vacuum may then remove no row deleted after it was taken. Every job drained meanwhile leaves
index entries that no scan may mark dead, because that snapshot could still see their rows.

The section drains ROUNDS rounds of jobs twice on the same worker processes: first with no other
session, then while a REPEATABLE READ transaction on the same database holds the snapshot it took
with a SELECT on `jobs`, before the first of those jobs was enqueued. Then, with the snapshot still
held and every drained job's dead entries in place, it measures the enqueue-to-start latency of the
idle workers. The snapshot's transaction is rolled back at the end, or on any error.
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import db

ROUNDS = 10
# The idle workers' latency under the snapshot is measured for 4 x the plain latency section's time
# (20 s, 4,000 jobs in a full run): the workers read their queues' heads (slow under the snapshot)
# every few seconds, and a 5 s window held one such read or none, by luck, so its p99 swung with it.
LATENCY_FACTOR = 4
STEPS = 2 * ROUNDS + 1  # progress steps: two sets of rounds, the latency


def measure(bench: Any, pool: Any, q: str, jobs: int) -> dict[str, Any]:
    """Run the section on `pool` (workers of queue `q`); `bench` is the running dj.bench._Bench."""
    from .bench import noop

    size = max(1, math.ceil(jobs / ROUNDS))
    result: dict[str, Any] = {"jobs": size * ROUNDS, "round": size, "processes": pool.processes}

    def drain_rounds(label: str) -> list[float]:
        rates = []
        for r in range(ROUNDS):
            bench.steps.start(f"old snapshot: {label}, round {r + 1}/{ROUNDS} of {size:,} jobs")
            noop.using(queue=q).enqueue_many([()] * size)
            t0 = time.perf_counter()
            t1 = bench.wait_empty(pool, q, size)
            bench.check_no_dead(q)
            rates.append(size / (t1 - t0))
        return rates

    without = drain_rounds("no snapshot")
    holder = db.connect(bench.url, autocommit=False)
    try:
        holder.execute("SET application_name = 'dj bench: old snapshot'")
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        # The SELECT takes the transaction's snapshot; from here on vacuum keeps every row it sees.
        holder.execute("SELECT count(*) FROM jobs WHERE queue = %s", (q,)).fetchone()
        held_from = time.perf_counter()
        bytes_before = bench.table_bytes()
        with_snapshot = drain_rounds("snapshot held")
        bench.steps.start("old snapshot: idle workers' latency, snapshot still held")
        latency = bench.latency(pool, q, LATENCY_FACTOR * bench.latency_s)
        result["held_s"] = time.perf_counter() - held_from
        result["table_bytes_before"], result["table_bytes_after"] = bytes_before, bench.table_bytes()
    finally:
        holder.rollback()
        holder.close()
    base, held = _overall(without, size), _overall(with_snapshot, size)
    result.update({
        "without_per_s": base, "with_per_s": held, "ratio": held / base if base else math.nan,
        "rounds_without_per_s": without, "rounds_with_per_s": with_snapshot, "latency_ms": latency,
    })
    return result


def _overall(rates: list[float], size: int) -> float:
    """Jobs per second over all rounds: the total over the summed drain times."""
    return len(rates) * size / sum(size / r for r in rates) if rates else math.nan


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's rows in `dj bench`'s table."""
    s = doc.get("old_snapshot")
    if not s:
        return
    ratio = s.get("ratio")
    ok = isinstance(ratio, (int, float)) and ratio >= 0.5
    t.add_row(f"old snapshot: drain {s['jobs']:,}, without / with",
              f"{n(s['without_per_s'])} / {n(s['with_per_s'])}",
              f">= 50% ({ratio:.0%})" if isinstance(ratio, (int, float)) else ">= 50%", mark(ok))
    lat = s.get("latency_ms") or {}
    if isinstance(lat.get("p99"), (int, float)):
        t.add_row("old snapshot: idle latency p50/p99", f"{lat['p50']:.1f} / {lat['p99']:.1f} ms", "p99 <= 50 ms",
                  mark(lat["p99"] <= 50))
