"""`/metrics`: Prometheus text, read from the database at each scrape.

| metric | type | labels |
|---|---|---|
| `dj_jobs` | gauge | queue, state (ready, scheduled, running, dead, waiting, and succeeded: kept successes, see dj/history.py; disjoint, so they add up) |
| `dj_jobs_retrying` | gauge (ready or scheduled jobs that failed before) | queue |
| `dj_queue_oldest_ready_age_seconds` | gauge | queue |
| `dj_queue_paused` | gauge (1 paused, 0 active) | queue |
| `dj_rate_limit`, `dj_rate_limit_period_seconds` | gauge: at most this many starts per period | scope (queue, task), name |
| `dj_rate_limit_used` | gauge: starts in the current window (the period up to now) | scope, name |
| `dj_jobs_succeeded_total`, `dj_jobs_failed_total` | counter | queue |
| `dj_job_run_seconds` | histogram of attempts' run time | queue |
| `dj_workers` | gauge | |
| `dj_worker_running_jobs`, `dj_worker_heartbeat_age_seconds` | gauge | worker |
| `dj_database_up` | gauge | |
| `dj_oldest_snapshot_age_seconds` | gauge: age of the oldest snapshot holding back vacuum of jobs (0: none) | |
| `dj_oldest_snapshot_info` | gauge, 1: the session that holds it | pid, application_name, state |
| `dj_keys_at_limit` | gauge: keys of per-key limits with as many running jobs as their limit | |
| `dj_key_held_jobs` | gauge: ready jobs a key at its limit holds back (the 20 keys holding most) | key, queue |

The totals come from job_stats, which keeps 10-second buckets for a day. So that they never go
down when old buckets are pruned, this process adds up what it sees: the first scrape counts every
bucket there is, later scrapes add only what grew since (buckets younger than a minute are
re-read, older ones are final). They are totals as seen by this `dj web` process, and start over
with it, which Prometheus treats as a counter reset.

The run-time histogram `dj_job_run_seconds` (queue) is built the same way from the run time the
workers record with every finished attempt (sum and cumulative buckets at 0.01/0.1/1/10/60 s).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Callable

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .. import admin
from ..errors import DJError
from . import queries

log = logging.getLogger(__name__)

RECENT = timedelta(seconds=60)  # buckets younger than this may still grow
STAT_COLUMNS = ("succeeded", "failed", "run_seconds", "run_le_0_01", "run_le_0_1", "run_le_1", "run_le_10", "run_le_60")
RUN_BOUNDS = ("0.01", "0.1", "1.0", "10.0", "60.0")


class DJCollector(Collector):
    def __init__(self, connection: Callable):
        self._connection = connection  # a context manager yielding a psycopg connection
        self._lock = threading.Lock()
        self._seen: dict[tuple, tuple[int, int]] = {}
        self._horizon = None
        self._totals: dict[str, list[int]] = {}

    def _add_new_stats(self, conn: psycopg.Connection) -> None:
        now = conn.execute("SELECT now()").fetchone()[0]
        columns = "bucket, queue, " + ", ".join(STAT_COLUMNS)
        if self._horizon is None:
            rows = conn.execute(f"SELECT {columns} FROM job_stats").fetchall()
        else:
            rows = conn.execute(f"SELECT {columns} FROM job_stats WHERE bucket >= %s", (self._horizon,)).fetchall()
        for bucket, queue, *values in rows:
            before = self._seen.get((bucket, queue), (0,) * len(values))
            total = self._totals.setdefault(queue, [0] * len(values))
            for i, (now_value, old_value) in enumerate(zip(values, before)):
                total[i] += max(now_value - old_value, 0)
            self._seen[(bucket, queue)] = tuple(values)
        self._horizon = now - RECENT
        self._seen = {k: v for k, v in self._seen.items() if k[0] >= self._horizon}

    def collect(self):
        up = GaugeMetricFamily("dj_database_up", "1 if the last scrape could read dj's database")
        try:
            with self._lock, self._connection() as conn:
                doc = queries.overview(conn)
                self._add_new_stats(conn)
                totals = {q: list(v) for q, v in self._totals.items()}
        except (psycopg.Error, OSError, DJError) as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("dj_jobs", "Jobs per queue and state (the states are disjoint)",
                                 labels=["queue", "state"])
        retrying = GaugeMetricFamily("dj_jobs_retrying", "Ready or scheduled jobs that failed before",
                                     labels=["queue"])
        oldest = GaugeMetricFamily("dj_queue_oldest_ready_age_seconds",
                                   "How long the oldest ready job of the queue has waited", labels=["queue"])
        paused = GaugeMetricFamily("dj_queue_paused", "1 if the queue is paused, else 0", labels=["queue"])
        kept = doc["succeeded"]["queues"]
        for q in doc["queues"]:
            for state in admin.STATES:
                jobs.add_metric([q["name"], state], q[state])
            jobs.add_metric([q["name"], "succeeded"], kept.get(q["name"], 0))
            retrying.add_metric([q["name"]], q["retrying"])
            oldest.add_metric([q["name"]], q["oldest_ready_age_s"])
            paused.add_metric([q["name"]], 1 if q["paused"] else 0)
        for name in sorted(set(kept) - {q["name"] for q in doc["queues"]}):  # only kept rows left
            jobs.add_metric([name, "succeeded"], kept[name])
        yield jobs
        yield retrying
        yield oldest
        yield paused

        rate = GaugeMetricFamily("dj_rate_limit", "Most starts (claims) per period", labels=["scope", "name"])
        period = GaugeMetricFamily("dj_rate_limit_period_seconds", "The rate limit's period",
                                   labels=["scope", "name"])
        used = GaugeMetricFamily("dj_rate_limit_used", "Starts in the current window", labels=["scope", "name"])
        for r in doc["rate_limits"]:
            rate.add_metric([r["scope"], r["name"]], r["limit"])
            period.add_metric([r["scope"], r["name"]], r["period_s"])
            used.add_metric([r["scope"], r["name"]], r["used"])
        yield rate
        yield period
        yield used

        succeeded = CounterMetricFamily("dj_jobs_succeeded", "Job attempts that succeeded", labels=["queue"])
        failed = CounterMetricFamily("dj_jobs_failed", "Job attempts that failed (retried or dead)",
                                     labels=["queue"])
        run_time = HistogramMetricFamily("dj_job_run_seconds", "Run time of finished job attempts",
                                         labels=["queue"])
        for queue, (s, f, seconds, *cumulative) in sorted(totals.items()):
            succeeded.add_metric([queue], s)
            failed.add_metric([queue], f)
            buckets = [(bound, count) for bound, count in zip(RUN_BOUNDS, cumulative)] + [("+Inf", s + f)]
            run_time.add_metric([queue], buckets, sum_value=seconds)
        yield succeeded
        yield failed
        yield run_time

        workers = GaugeMetricFamily("dj_workers", "Registered worker processes")
        workers.add_metric([], len(doc["workers"]))
        yield workers
        running = GaugeMetricFamily("dj_worker_running_jobs", "Jobs a worker holds", labels=["worker"])
        age = GaugeMetricFamily("dj_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat",
                                labels=["worker"])
        for w in doc["workers"]:
            running.add_metric([w["name"]], w["running"])
            age.add_metric([w["name"]], w["heartbeat_age_s"])
        yield running
        yield age

        snap = doc["oldest_snapshot"]
        snap_age = GaugeMetricFamily("dj_oldest_snapshot_age_seconds",
                                     "Age of the oldest snapshot in dj's database, which holds back vacuum of jobs "
                                     "(0 if no other session holds one)")
        snap_age.add_metric([], snap["age_s"] if snap else 0.0)
        yield snap_age
        info = GaugeMetricFamily("dj_oldest_snapshot_info", "The session holding the oldest snapshot",
                                 labels=["pid", "application_name", "state"])
        if snap:
            info.add_metric([str(snap["pid"]), snap["application_name"], snap["state"]], 1)
        yield info

        at_limit = GaugeMetricFamily("dj_keys_at_limit", "Keys of per-key limits with as many running jobs as "
                                     "their limit (at most the 20 holding back most jobs are counted)")
        at_limit.add_metric([], len(doc["keys_at_limit"]))
        yield at_limit
        held = GaugeMetricFamily("dj_key_held_jobs", "Ready jobs held back by their key's limit (counted to 10,000)",
                                 labels=["key", "queue"])
        for k in doc["keys_at_limit"]:
            held.add_metric([k["key"], k["queue"]], k["held"])
        yield held


def registry(connection: Callable) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)  # no database read at registration
    reg.register(DJCollector(connection))
    return reg
