"""Cron: `@job(cron="*/5 * * * *")` enqueues the task at every tick of its expression.

There is no scheduler process and no leader. Every worker's heartbeat thread calls `fire_due`,
and the database decides who enqueues a tick: `cron_runs` holds one row per cron task with the
last tick that was enqueued. To fire a tick, a worker locks that row (`FOR UPDATE SKIP LOCKED`,
only while `last_tick` is older than the tick), moves `last_tick` to the tick and enqueues the job
in the same transaction. So each tick's job commits together with its claim, or neither does:
however many workers and hosts run, a tick is enqueued exactly once, and a worker that dies
half-way leaves the tick for the next heartbeat.

Time. Expressions are read by croniter: five fields, an optional sixth for seconds (croniter's
extension), or `@hourly`, `@daily` and the like. They are evaluated in UTC against the
database's clock (`now()`), so hosts with skewed clocks agree on what is due. A tick is enqueued
within one heartbeat interval of its time (5 s by default, a third of the lock timeout if that is
shorter), with `run_at` set to the tick. Ticks closer together than that interval coalesce, as
misfires do.

A new cron task starts with its most recent past tick marked as done: its first run is its first
tick after a worker first sees it, not an immediate catch-up.

Misfires (coalescing). When no worker ran through several ticks, the first heartbeat afterwards
enqueues the most recent missed tick once and skips the older ones; it logs how many it skipped.
Changing a task's expression keeps its last tick, so a due tick of the new expression fires once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import psycopg
from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter

if TYPE_CHECKING:
    from .task import Task

log = logging.getLogger("dj.cron")

# Counting every skipped tick of a per-second expression after a week away would take seconds.
MAX_COUNTED_SKIPS = 1000

_BASELINE = """
INSERT INTO cron_runs (name, expr, last_tick)
SELECT name, expr, tick FROM unnest(%s::text[], %s::text[], %s::timestamptz[]) AS d(name, expr, tick)
ORDER BY name
ON CONFLICT (name) DO NOTHING
"""

# Rows another worker is firing right now are skipped, not waited for. FOR UPDATE re-reads a row
# that changed since the statement began and checks `last_tick < tick` again on the newest version,
# so a tick that another worker has just committed is not due any more.
_LOCK_DUE = """
SELECT c.name, c.last_tick
FROM cron_runs c JOIN unnest(%s::text[], %s::timestamptz[]) AS d(name, tick) USING (name)
WHERE c.last_tick < d.tick
ORDER BY c.name
FOR UPDATE OF c SKIP LOCKED
"""

_MARK_FIRED = """
UPDATE cron_runs SET last_tick = %s, expr = %s, last_job_id = %s, fired_at = now() WHERE name = %s
"""


@dataclass(frozen=True)
class Fired:
    name: str
    tick: datetime
    job_id: int
    skipped: int  # missed older ticks that were coalesced into this run (counted up to MAX_COUNTED_SKIPS)
    previous: datetime  # the tick enqueued before this one (or the one a worker first saw)


@dataclass(frozen=True)
class Scheduled:
    name: str
    expr: str
    next_run: datetime


def validate(expr: str) -> str:
    """Return `expr` if croniter accepts it and it ever fires; raise ValueError otherwise."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"cron expression must be a non-empty string, got {expr!r}")
    try:
        croniter(expr, datetime.now(timezone.utc)).get_next(datetime)
    except CroniterBadDateError:
        raise ValueError(f"cron expression {expr!r} never fires") from None
    except (CroniterBadCronError, CroniterError, ValueError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None
    return expr


def latest_tick(expr: str, now: datetime) -> datetime:
    """The most recent tick at or before `now`, in UTC."""
    now = utc(now)
    return croniter(expr, now + timedelta(microseconds=1)).get_prev(datetime)


def next_tick(expr: str, now: datetime) -> datetime:
    """The first tick strictly after `now`, in UTC."""
    return croniter(expr, utc(now)).get_next(datetime)


def cron_tasks() -> list[Task]:
    """The registered tasks that have a cron expression, by name."""
    from .task import registered

    return [t for _, t in sorted(registered().items()) if getattr(t, "cron", None)]


def schedule(now: datetime | None = None, tasks: list[Task] | None = None) -> list[Scheduled]:
    """Each cron task's name, expression and next run after `now` (default: this machine's clock)."""
    now = utc(now or datetime.now(timezone.utc))
    return [Scheduled(t.name, t.cron, next_tick(t.cron, now)) for t in (cron_tasks() if tasks is None else tasks)]


def last_runs(conn: psycopg.Connection) -> dict[str, dict]:
    """What cron_runs records for each task: last_tick, last_job_id, fired_at."""
    rows = conn.execute("SELECT name, last_tick, last_job_id, fired_at FROM cron_runs").fetchall()
    return {r[0]: {"last_tick": r[1], "last_job_id": r[2], "fired_at": r[3]} for r in rows}


_warned_missing_table = False


def fire_due(conn: psycopg.Connection, now: datetime | None = None,
             tasks: list[Task] | None = None) -> list[Fired]:
    """Enqueue every cron tick that is due and that no worker has enqueued yet.

    `now` defaults to the database's clock; `tasks` to every registered cron task. Safe to call
    from any number of workers at once. Raises only psycopg errors of the connection itself; a task
    that cannot be enqueued is logged and tried again on the next call.
    """
    global _warned_missing_table
    tasks = cron_tasks() if tasks is None else [t for t in tasks if getattr(t, "cron", None)]
    if not tasks:
        return []
    by_name = {t.name: t for t in tasks}
    names = sorted(by_name)
    fired: list[Fired] = []
    try:
        with conn.transaction():
            if now is None:
                now = conn.execute("SELECT now()").fetchone()[0]
            ticks = {n: latest_tick(by_name[n].cron, now) for n in names}
            conn.execute(_BASELINE, (names, [by_name[n].cron for n in names], [ticks[n] for n in names]))
            due = conn.execute(_LOCK_DUE, (names, [ticks[n] for n in names])).fetchall()
            for name, last_tick in due:
                task, tick = by_name[name], ticks[name]
                try:
                    with conn.transaction():  # a savepoint: one task's failure leaves the others' ticks
                        job_id = task.using(conn=conn, run_at=tick).enqueue()
                        conn.execute(_MARK_FIRED, (tick, task.cron, job_id, name))
                except psycopg.OperationalError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad task must not stop the others
                    log.warning("cron %s: could not enqueue the tick at %s (%s); trying again next heartbeat",
                                name, _fmt(tick), str(exc).strip().splitlines()[0] if str(exc).strip() else
                                type(exc).__name__)
                    continue
                fired.append(Fired(name, tick, job_id, _count_skipped(task.cron, last_tick, tick), last_tick))
    except psycopg.errors.UndefinedTable:
        if not _warned_missing_table:
            _warned_missing_table = True
            log.warning("cron jobs are registered but the database has no cron_runs table; run 'dj migrate'")
        return []
    except psycopg.Error:
        raise
    except Exception:  # noqa: BLE001 - the caller is the heartbeat thread, which must keep beating
        log.exception("cron: could not fire due ticks")
        return []
    for f in fired:
        if f.skipped:
            # Ticks closer together than the heartbeat interval coalesce all the time: not worth a warning.
            level = logging.WARNING if f.tick - f.previous > timedelta(minutes=1) else logging.INFO
            log.log(level, "cron %s: %s%d missed tick(s) skipped; enqueued only the latest, %s, as job %d",
                    f.name, "at least " if f.skipped >= MAX_COUNTED_SKIPS else "", f.skipped,
                    _fmt(f.tick), f.job_id)
        else:
            log.info("cron %s: enqueued job %d for the tick at %s", f.name, f.job_id, _fmt(f.tick))
    return fired


def _count_skipped(expr: str, last_tick: datetime, tick: datetime) -> int:
    it = croniter(expr, utc(last_tick))
    skipped = 0
    while skipped < MAX_COUNTED_SKIPS and it.get_next(datetime) < tick:
        skipped += 1
    return skipped


def utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _fmt(when: datetime) -> str:
    return utc(when).strftime("%Y-%m-%d %H:%M:%S UTC")
