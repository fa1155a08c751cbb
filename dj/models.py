"""dj's tables, as SQLAlchemy models. Alembic migrations are written from these; the hot path
does not use the ORM (see dj/sql.py)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, Column, Boolean, Float, Index, Integer, MetaData, SmallInteger, Table, Text, false, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

metadata = MetaData()

TZ = TIMESTAMP(timezone=True)


class Base(DeclarativeBase):
    metadata = metadata


class Job(Base):
    """One row per job that has not succeeded yet: ready, scheduled, running or dead.

    States (disjoint): dead = failed_at set; running = locked_by set; waiting = run_at 'infinity'
    (its dependencies have not all succeeded: see JobDependency); scheduled = run_at in the future;
    ready = the rest.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    queue: Mapped[str] = mapped_column(Text, nullable=False, server_default="default")
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")
    task: Mapped[str] = mapped_column(Text, nullable=False)
    args: Mapped[list] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    kwargs: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    run_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="25")
    timeout: Mapped[float | None] = mapped_column(Float)
    locked_at: Mapped[datetime | None] = mapped_column(TZ)
    locked_by: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime | None] = mapped_column(TZ)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))
    unique_key: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[dict | None] = mapped_column(JSONB)
    # A per-key limit (@job(limit_by=..., limit=N)): at most key_limit jobs with this limit_key run
    # at once. The key is "task:key", so keys of different tasks never share a limit.
    limit_key: Mapped[str | None] = mapped_column(Text)
    key_limit: Mapped[int | None] = mapped_column(Integer)
    # The OpenTelemetry span context of its enqueue, as the propagator writes it (W3C traceparent by
    # default), so its attempts join that trace (dj/tracing.py); NULL when enqueued outside a span.
    trace_context: Mapped[dict | None] = mapped_column(JSONB)
    # Seconds to keep the job after it succeeds (@job(keep=...), using(keep=...)); NULL: deleted
    # on success, as in DelayedJob. A kept success moves to job_results (see JobResult).
    keep: Mapped[float | None] = mapped_column(Float)
    # True once a job enqueued with after=[this id] waits for it (dj/dependencies.py); NULL otherwise.
    has_dependents: Mapped[bool | None] = mapped_column(Boolean)

    __table_args__ = (
        # The claim query's exact shape: equality on queue, then ORDER BY priority, run_at, id,
        # over unlocked, live rows only. Running and dead rows stay out of the index, so it holds
        # only what a worker may claim, and a claim reads it in order and stops at LIMIT. Jobs
        # with a per-key limit stay out too (jobs_keyed_idx has them): a key at its limit would
        # otherwise leave its whole backlog in front of every claim, to be read and skipped.
        Index(
            "jobs_claim_idx",
            "queue", "priority", "run_at", "id",
            postgresql_where=text("locked_by IS NULL AND failed_at IS NULL AND limit_key IS NULL"),
        ),
        # Ready jobs with a per-key limit, per queue and key in claim order: a claim finds the keys
        # of a queue by skipping from one key to the next, and reads each key's head (sql.LOCK_KEYS,
        # sql.CLAIM).
        Index(
            "jobs_keyed_idx",
            "queue", "limit_key", "priority", "run_at", "id",
            postgresql_where=text("locked_by IS NULL AND failed_at IS NULL AND limit_key IS NOT NULL"),
        ),
        # Running jobs with a per-key limit (few): counted per key by every claim of that key.
        Index("jobs_keyed_running_idx", "limit_key",
              postgresql_where=text("locked_by IS NOT NULL AND limit_key IS NOT NULL")),
        # Running jobs (few at a time): counted per queue for concurrency limits, and looked up by
        # worker for crash recovery.
        Index("jobs_running_idx", "queue", "locked_by", postgresql_where=text("locked_by IS NOT NULL")),
        # A key is held while its job is ready, scheduled or running; enqueue's ON CONFLICT uses it.
        Index("jobs_unique_key_idx", "unique_key", unique=True,
              postgresql_where=text("unique_key IS NOT NULL AND failed_at IS NULL")),
        Index("jobs_dead_idx", "queue", "failed_at", postgresql_where=text("failed_at IS NOT NULL")),
        # Jobs waiting for their dependencies (run_at 'infinity', dj/dependencies.py), per queue:
        # what a --burst worker with nothing to claim asks about (dependencies.RELEASABLE). Without
        # it that question read the whole heap, dead rows of the drain included: 0.6 s at the end
        # of a 50k-job drain. Only waiting jobs have an entry, so other jobs pay nothing.
        Index("jobs_waiting_idx", "queue",
              postgresql_where=text("run_at = 'infinity' AND failed_at IS NULL AND locked_by IS NULL")),
    )


class JobResult(Base):
    """A kept success (a job enqueued with keep=...): its return value, run time and finish time,
    until `expires_at`, when a worker prunes it (dj/pruning.py). COMPLETE_KEEP (dj/sql.py) moves the
    row here from jobs in the statement that records the success, so the hot table and its claim
    index never hold finished jobs, however many are kept."""

    __tablename__ = "job_results"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # the job's id
    queue: Mapped[str] = mapped_column(Text, nullable=False)
    priority: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    task: Mapped[str] = mapped_column(Text, nullable=False)
    args: Mapped[list] = mapped_column(JSONB, nullable=False)
    kwargs: Mapped[dict] = mapped_column(JSONB, nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    batch_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    run_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    finished_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(TZ, nullable=False)
    run_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    # The return value as JSON; NULL with result_error set when it could not be kept (not JSON, or
    # over the size limit): the job still succeeded, and dj.result() raises dj.ResultError.
    result: Mapped[dict | list | str | int | float | bool | None] = mapped_column(JSONB)
    result_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # Pruning reads the expired rows in this order, a small batch at a time.
        Index("job_results_expires_idx", "expires_at"),
    )


class Worker(Base):
    """A live worker process. It heartbeats here; jobs locked by a stale worker are reclaimed."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str] = mapped_column(Text, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    queues: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    concurrency: Mapped[int] = mapped_column(Integer, nullable=False)
    running: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    started_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))
    heartbeat_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))


class JobStat(Base):
    """Succeeded and failed attempts per queue in 10-second buckets, since successes leave no row."""

    __tablename__ = "job_stats"

    bucket: Mapped[datetime] = mapped_column(TZ, primary_key=True)
    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    succeeded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    failed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    # Run time of those attempts: the sum, and cumulative counts of attempts within 0.01/0.1/1/10/60 s.
    run_seconds: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    run_le_0_01: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    run_le_0_1: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    run_le_1: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    run_le_10: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    run_le_60: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class QueueSetting(Base):
    """Per-queue settings. A queue with no row is active. Workers claim nothing from a paused queue."""

    __tablename__ = "queue_settings"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=false())
    concurrency_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A rate limit: at most rate_limit claims in any rate_period seconds (1, 60 or 3600), all
    # workers and hosts together; both NULL when the queue has none (dj/rates.py).
    rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rate_period: Mapped[float | None] = mapped_column(Float, nullable=True)


class RateStart(Base):
    """The sliding log of rate limits: `n` jobs of `key` ('queue:NAME' or 'task:NAME') were claimed
    at `started_at`, one row per claim statement and key. A claim counts the rows of the last
    period; rows older than that are pruned. `max_starts` and `period` repeat the limit in force,
    so `dj status` can show a task's limit, which lives in code (@job(rate=...)). See dj/rates.py."""

    __tablename__ = "rate_starts"

    # The primary key is also the window's index: key, then time.
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(TZ, primary_key=True)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    max_starts: Mapped[int] = mapped_column(Integer, nullable=False)
    period: Mapped[float] = mapped_column(Float, nullable=False)


class Batch(Base):
    """A group of jobs; its callback job is enqueued once, when succeeded + dead reaches total."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    on_complete: Mapped[str | None] = mapped_column(Text)
    args: Mapped[list] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    kwargs: Mapped[dict] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    queue: Mapped[str] = mapped_column(Text, nullable=False, server_default="default")
    description: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int | None] = mapped_column(Integer)  # NULL while jobs are still being added
    succeeded: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    dead: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    result: Mapped[dict | None] = mapped_column(JSONB)
    has_dependents: Mapped[bool | None] = mapped_column(Boolean)  # as Job.has_dependents
    created_at: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("now()"))
    finished_at: Mapped[datetime | None] = mapped_column(TZ)


# A waiting job (`job_id`, run_at 'infinity') and one job or batch it waits for. A row goes when its
# dependency succeeds; the job is released when it has none left, and dies when one dies
# (dj_settle_dependents, created in migration 0009; docs/ARCHITECTURE.md, "Dependencies"). A plain
# table, not a mapped class: it has no key of its own, and rows are found by either end.
job_dependencies = Table(
    "job_dependencies", metadata,
    Column("job_id", BigInteger, nullable=False),
    Column("after_job", BigInteger),
    Column("after_batch", BigInteger),
    CheckConstraint("(after_job IS NULL) <> (after_batch IS NULL)", name="job_dependencies_one_target"),
    Index("job_dependencies_after_job_idx", "after_job", postgresql_where=text("after_job IS NOT NULL")),
    Index("job_dependencies_after_batch_idx", "after_batch", postgresql_where=text("after_batch IS NOT NULL")),
    Index("job_dependencies_job_idx", "job_id"),
)


class CronRun(Base):
    """One row per cron task: the last tick enqueued. A worker fires a tick by moving `last_tick`
    forward and enqueueing the job in one transaction, so each tick is enqueued once (dj/cron.py)."""

    __tablename__ = "cron_runs"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    expr: Mapped[str] = mapped_column(Text, nullable=False)
    last_tick: Mapped[datetime] = mapped_column(TZ, nullable=False)
    last_job_id: Mapped[int | None] = mapped_column(BigInteger)
    fired_at: Mapped[datetime | None] = mapped_column(TZ)


class Maintenance(Base):
    """A chore one worker at a time does for all, taken as a lease on its row: 'vacuum jobs'
    (dj/vacuum.py) and 'prune results' (dj/pruning.py). `dead_after` is how many dead rows the last run left behind (those
    an old snapshot still needed), so the next run waits for new ones."""

    __tablename__ = "maintenance"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime] = mapped_column(TZ, nullable=False, server_default=text("'-infinity'"))
    started_at: Mapped[datetime | None] = mapped_column(TZ)
    finished_at: Mapped[datetime | None] = mapped_column(TZ)
    seconds: Mapped[float | None] = mapped_column(Float)
    dead_after: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    runs: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
