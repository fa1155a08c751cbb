"""`dj bench`'s deps section: what dependencies (`using(after=[...])`) cost, on 2 worker processes.

- **Fan-in drain.** Each group is a batch of GROUP no-op jobs and GROUP more jobs; in the measured
  rounds those wait for the batch (`after=[batch]`), in the reference rounds they do not. Everything
  is enqueued in one transaction, so the workers start on a full queue at its commit; the figure is
  the drain's rate and its ratio to the reference, rounds alternating so that a change of load on
  the machine hits both alike. The dependents are released by the statement that completes their
  batch's last job (dj_settle_dependents), not found by a poll.
- **Hop latency.** A chain of CHAIN_HOPS jobs, each after the one before, enqueued in one
  transaction; each records when it started. A hop is the time between two starts: the job before
  runs (one INSERT), its success is flushed, the flush releases the next and NOTIFYs, a worker
  claims it. p50 and p99 of the hops say that a dependent is woken at once.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from psycopg import sql as pgsql

from . import db
from .batches import Batch

if TYPE_CHECKING:
    from .bench import _Bench

PROCESSES = 2
GROUP = 100  # jobs per batch, and dependents per batch
ROUNDS = 5
ROUND_JOBS = 40_000  # both halves of each group, all groups
CHAIN_HOPS = 300


def measure(bench: "_Bench") -> dict[str, Any]:
    from .bench import _WorkerPool, noop, percentile, stamp

    q = bench.queue(f"deps{PROCESSES}")
    n = 2 * GROUP if bench.quick else max(bench.jobs, ROUND_JOBS)
    groups = max(1, n // (2 * GROUP))
    batch_ids: list[int] = []

    def fill(after: bool) -> None:
        with db.connect(bench.url) as conn:  # one transaction: the workers see it all at its commit
            for _ in range(groups):
                with Batch(conn=conn) as b:
                    noop.using(queue=q, conn=conn).enqueue_many([()] * GROUP)
                assert b.id is not None
                batch_ids.append(b.id)
                noop.using(queue=q, conn=conn, after=[b] if after else None).enqueue_many([()] * GROUP)

    def fill_and_drain(pool: _WorkerPool, after: bool) -> float:
        fill(after)
        return bench.timed_drain(pool, q, 2 * GROUP * groups)

    table = f"{bench.latency_table}_deps"
    with _WorkerPool(bench.url, [q], PROCESSES) as pool:
        fill_and_drain(pool, True)  # warm-up, both kinds
        fill_and_drain(pool, False)
        plain, deps = [], []
        for _ in range(1 if bench.quick else ROUNDS):
            plain.append(fill_and_drain(pool, False))
            deps.append(fill_and_drain(pool, True))
        hops = _chain(bench, pool, q, table, stamp, 20 if bench.quick else CHAIN_HOPS)
    with db.connect(bench.url, autocommit=True) as conn:
        conn.execute("DELETE FROM batches WHERE id = ANY(%s)", (batch_ids,))
        conn.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(pgsql.Identifier(table)))
    per_s, plain_per_s = statistics.median(deps), statistics.median(plain)
    return {"processes": PROCESSES, "group": GROUP, "jobs": 2 * GROUP * groups, "per_s": per_s,
            "plain_per_s": plain_per_s, "ratio": per_s / plain_per_s, "rounds": {"after": deps, "plain": plain},
            "hops": len(hops), "hop_ms": {"p50": percentile(hops, 50), "p99": percentile(hops, 99), "max": max(hops)}}


def _chain(bench: "_Bench", pool: Any, q: str, table: str, stamp: Any, hops: int) -> list[float]:
    """Run a chain of `hops` + 1 stamping jobs; the gaps between their starts, in ms, ascending."""
    ident = pgsql.Identifier(table)
    with db.connect(bench.url, autocommit=True) as conn:
        conn.execute(pgsql.SQL("CREATE UNLOGGED TABLE IF NOT EXISTS {} (job_id bigint PRIMARY KEY,"
                               " started float8 NOT NULL)").format(ident))
        conn.execute(pgsql.SQL("TRUNCATE {}").format(ident))
    with db.connect(bench.url) as conn:
        previous = stamp.using(queue=q, conn=conn).enqueue(table)
        for _ in range(hops):
            previous = stamp.using(queue=q, conn=conn, after=[previous]).enqueue(table)
    bench.wait_empty(pool, q, hops)
    bench.check_no_dead(q)
    with db.connect(bench.url, autocommit=True) as conn:
        starts = [s for (s,) in conn.execute(pgsql.SQL("SELECT started FROM {} ORDER BY job_id").format(ident))]
    return sorted((b - a) * 1000 for a, b in zip(starts, starts[1:]))


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's rows in `dj bench`'s table."""
    d = doc.get("deps")
    if not d:
        return
    t.add_row(f"drain with after= a batch, {d['processes']} processes (half of {d['jobs']:,} jobs wait)",
              n(d["per_s"]), f"the same jobs without after=, alternately: {n(d['plain_per_s'])} ({d['ratio']:.0%})", "")
    h = d["hop_ms"]
    t.add_row(f"dependency chain of {d['hops']} hops: start to start p50 / p99",
              f"{h['p50']:.1f} / {h['p99']:.1f} ms", "woken by the completion, not a poll", "")
