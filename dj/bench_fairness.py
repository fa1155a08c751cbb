"""`dj bench`'s fairness section: one tenant's backlog must not hold back another tenant.

Tenant A enqueues TENANT_A_JOBS jobs (100,000; a tenth with --quick), then tenant B enqueues
TENANT_B_JOBS (100), on two worker processes that were running before. Each job takes JOB_SECONDS,
and the task has a per-key limit by tenant (`@job(limit_by=tenant, limit=LIMIT)`): A's backlog
alone would keep every worker thread busy for minutes, but A may hold only LIMIT of them. The
figure is the time from B's enqueue (committed) until the last of B's jobs started, with how many
of A's jobs were still waiting then (so B's did not wait for A's backlog). A's leftover jobs are
deleted at the end.

The workers import this module through DJ_TASKS; the other sections' workers do not, so their
claims do not look for keys (dj.worker.producer: a worker that knows no keyed task skips that).
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import sql as pgsql

from . import db
from .context import current_job
from .task import job

TENANT_A_JOBS = 100_000
TENANT_B_JOBS = 100
JOB_SECONDS = 0.005
LIMIT = 4


@job(name="dj.bench.tenant_job", limit_by=lambda tenant, table=None: tenant, limit=LIMIT)
def tenant_job(tenant: str, table: str | None = None) -> None:
    """Works JOB_SECONDS; a job of tenant B also records when it started."""
    if table is not None:
        started = time.time()
        ctx = current_job()
        with db.pool().connection() as conn:
            conn.execute(pgsql.SQL("INSERT INTO {} (job_id, started) VALUES (%s, %s)").format(pgsql.Identifier(table)),
                         (ctx.id if ctx else 0, started))
    time.sleep(JOB_SECONDS)


def measure(bench: Any, pool_class: Any) -> dict[str, Any]:
    """Run the section; `bench` is the running dj.bench._Bench, `pool_class` its worker pool."""
    import os

    conn, q = bench.conn, bench.queue("fair")
    a_jobs = TENANT_A_JOBS // 10 if bench.quick else TENANT_A_JOBS
    table = f"dj_bench_fair_{bench.run}"
    ident = pgsql.Identifier(table)
    conn.execute(pgsql.SQL("CREATE UNLOGGED TABLE {} (job_id bigint PRIMARY KEY, started float8 NOT NULL)"
                           ).format(ident))
    tasks = ",".join(filter(None, [os.environ.get("DJ_TASKS", ""), "dj.bench", __name__]))
    target = tenant_job.using(queue=q)
    try:
        with pool_class(bench.url, [q], 2, env={"DJ_TASKS": tasks}) as pool:
            bench.steps.start(f"fairness: tenant A enqueues {a_jobs:,} jobs, then tenant B {TENANT_B_JOBS}")
            target.enqueue_many([("A",)] * a_jobs)
            t0 = time.perf_counter()
            b_ids = set(target.enqueue_many([("B", table)] * TENANT_B_JOBS))
            enqueued = time.time()  # committed: the workers were woken by its NOTIFY
            b_enqueue_s = time.perf_counter() - t0
            deadline = time.monotonic() + 300
            while conn.execute(pgsql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0] < TENANT_B_JOBS:
                pool.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("tenant B's jobs did not all start within 300 s")
                time.sleep(0.01)
            a_waiting = conn.execute("SELECT count(*) FROM jobs WHERE queue = %s AND limit_key = %s",
                                     (q, "dj.bench.tenant_job:A")).fetchone()[0]
            starts = [s for job_id, s in conn.execute(pgsql.SQL("SELECT job_id, started FROM {}").format(ident))
                      if job_id in b_ids]
        bench.check_no_dead(q)
        last = max(starts) - enqueued
        return {"tenant_a_jobs": a_jobs, "tenant_b_jobs": TENANT_B_JOBS, "limit": LIMIT, "job_s": JOB_SECONDS,
                "processes": 2, "b_last_start_s": last, "b_first_start_s": min(starts) - enqueued,
                "b_enqueue_s": b_enqueue_s, "a_still_waiting": a_waiting,
                # What B would have waited behind A's backlog, with every thread of the two processes on it.
                "a_backlog_s_unlimited": a_jobs * JOB_SECONDS / 16}
    finally:
        conn.execute("DELETE FROM jobs WHERE queue = %s", (q,))
        conn.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(ident))


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's row in `dj bench`'s table."""
    f = doc.get("fairness")
    if not f:
        return
    t.add_row(f"fairness: last of B's {f['tenant_b_jobs']} jobs started, after A's {f['tenant_a_jobs']:,}",
              f"{f['b_last_start_s']:.2f} s ({f['a_still_waiting']:,} of A's waiting)",
              f"within seconds (A's backlog: ~{f['a_backlog_s_unlimited']:.0f} s)", mark(f["b_last_start_s"] <= 5))
