"""`dj bench`'s async-single section: one job per `await task.enqueue_async()` against a bare
async INSERT round trip on the same pool (dj's AsyncConnectionPool for this loop).

Both contenders take a connection from the pool and give it back the same way (getconn/putconn,
as dj does), so the difference is what dj adds: encoding the arguments, the job's columns and
its NOTIFY. They run in short alternating blocks (which one goes first alternates too), so that a
change of load hits both alike; the ratio is the median of the ratios of neighbouring blocks, and
each rate the median of its blocks.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import db

BLOCK = 50  # calls per block
GOAL = 0.9  # of the bare INSERT's rate (issue 13)


def measure(bench: Any) -> dict[str, Any]:
    """Run the section; `bench` is the running dj.bench._Bench."""
    bench.steps.start("async single enqueues vs bare async INSERTs")
    q = bench.queue("async-single")
    n = max(700, bench.jobs // 10)  # calls per contender
    result = asyncio.run(_measure(bench.url, q, math.ceil(n / BLOCK)))
    bench.conn.execute("DELETE FROM jobs WHERE queue = %s", (q,))
    return result


async def _measure(url: str, q: str, blocks: int) -> dict[str, Any]:
    from .bench import BARE_INSERT, noop

    pool = await db.async_pool(url)
    target = noop.using(queue=q)
    params = (q, noop.name)

    async def insert() -> None:
        conn = await pool.getconn()
        try:
            await (await conn.execute(BARE_INSERT, params)).fetchone()
        finally:
            await pool.putconn(conn)

    contenders: dict[str, Callable[[], Awaitable[Any]]] = {"enqueue": target.enqueue_async, "insert": insert}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    try:
        for call in contenders.values():
            for _ in range(20):  # warm-up: psycopg prepares a statement after a few runs
                await call()
        for b in range(blocks):
            for name in ("enqueue", "insert") if b % 2 == 0 else ("insert", "enqueue"):
                call = contenders[name]
                t = time.perf_counter()
                for _ in range(BLOCK):
                    await call()
                rates[name].append(BLOCK / (time.perf_counter() - t))
    finally:
        await db.close_async_pools()
    return {"enqueue_per_s": statistics.median(rates["enqueue"]), "insert_per_s": statistics.median(rates["insert"]),
            "ratio": statistics.median(e / i for e, i in zip(rates["enqueue"], rates["insert"])),
            "blocks": blocks, "per_block": BLOCK}


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's rows in `dj bench`'s table."""
    s = doc.get("async_single")
    if not s:
        return
    ratio = s["ratio"]
    t.add_row("enqueue_async, one per call, dj's async pool", n(s["enqueue_per_s"]),
              f">= {GOAL:.0%} of bare async INSERT ({ratio:.0%})", mark(ratio >= GOAL))
    t.add_row("bare async INSERT, same pool", n(s["insert_per_s"]), "", "")
