"""`python -m dj.chaos`: a run of many jobs under fire, to check that none is lost.

4 worker processes x 8 threads (one supervisor, as `dj work --processes 4` runs them) work N jobs,
1% of which fail on purpose (and are dead after that one attempt). Every few seconds a random
worker process is killed with SIGKILL, and once, part way through, PostgreSQL is stopped and
started again. Each job appends its start and its end to a log file of its process, so the run can
tell afterwards which job ran where, how often, and whether it finished.

By default it runs on a throwaway server of dj's embedded kind in a temporary DJ_HOME, which is
the only server it ever restarts. With --database-url it uses that server (on a queue of its own)
and skips the restart.

At the end it prints the jobs enqueued, succeeded, dead, lost (must be 0), the jobs that ran more
than once (each must follow a kill of the process that ran the earlier attempt), and the kills made.
It exits 0 when nothing was lost and every extra run is explained, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from . import current_job, job
from .errors import DJError

RUNS_DIR_ENV = "DJ_CHAOS_DIR"

_fd: int | None = None
_fd_lock = threading.Lock()


def _log_run(kind: str, job_id: int, attempt: int) -> None:
    """Append one line to this process's run log. One small O_APPEND write survives a SIGKILL of
    the process right after it returns, unlike a buffered file."""
    global _fd
    if _fd is None:
        with _fd_lock:
            if _fd is None:
                path = os.path.join(os.environ[RUNS_DIR_ENV], f"runs-{os.getpid()}.log")
                _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{kind} {job_id} {attempt} {os.getpid()}\n".encode())


class ChaosFailure(Exception):
    pass


@job(name="dj.chaos.work")
def work(fail: bool = False, ms: float = 0.0) -> None:
    """Log the start, sleep about `ms` milliseconds, then fail (if told to) or log the end."""
    ctx = current_job()
    _log_run("S", ctx.id, ctx.attempt)
    if ms:
        time.sleep(ms / 1000 * random.uniform(0.5, 1.5))
    if fail:
        raise ChaosFailure("this job fails on purpose")
    _log_run("E", ctx.id, ctx.attempt)


@dataclass
class Run:
    job_id: int
    attempt: int
    pid: int
    finished: bool = False


def read_runs(folder: str | Path) -> dict[int, list[Run]]:
    """Every run of every job, from the run logs in `folder`, by job id, in attempt order."""
    runs: dict[tuple[int, int], Run] = {}
    for path in Path(folder).glob("runs-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue  # a line cut short by a kill
            kind, job_id, attempt, pid = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
            run = runs.setdefault((job_id, attempt), Run(job_id, attempt, pid))
            if kind == "E":
                run.finished = True
    by_job: dict[int, list[Run]] = defaultdict(list)
    for run in sorted(runs.values(), key=lambda r: (r.job_id, r.attempt)):
        by_job[run.job_id].append(run)
    return by_job


class ThrowawayServer:
    """A PostgreSQL server of dj's embedded kind in a temporary DJ_HOME: safe to stop and restart,
    and gone after destroy(). Started and stopped with `dj db start|stop`, as a user would."""

    def __init__(self, prefix: str = "dj-throwaway-"):
        self.home = tempfile.mkdtemp(prefix=prefix)
        self.env = {**os.environ, "DJ_HOME": self.home, "DJ_DATABASE_URL": ""}
        self.url = self.start()

    def _db(self, action: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dj", "db", action], env=self.env, capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise DJError(f"dj db {action} failed for the throwaway server in {self.home}: "
                          f"{result.stderr.strip() or result.stdout.strip()}")
        return result.stdout.strip()

    def start(self) -> str:
        return self._db("start")

    def stop(self) -> None:
        self._db("stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except (DJError, subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.home, ignore_errors=True)


@dataclass
class Report:
    enqueued: int = 0
    succeeded: int = 0
    dead: int = 0
    meant_to_fail: int = 0
    lost: int = 0
    unfinished: int = 0
    unexpected_dead: int = 0
    ran_more_than_once: int = 0
    explained_by_kill: int = 0
    unexplained: list[int] = field(default_factory=list)
    kills: int = 0
    restarts: int = 0
    downtime: float = 0.0
    outage_lines: int = 0
    tracebacks: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unfinished or self.unexpected_dead or self.unexplained or self.tracebacks
                    or self.dead != self.meant_to_fail)

    def table(self) -> str:
        rows = [
            ("enqueued", f"{self.enqueued}", ""),
            ("succeeded", f"{self.succeeded}", ""),
            ("dead", f"{self.dead}", f"{self.meant_to_fail} meant to fail"
             + (f", {self.unexpected_dead} others" if self.unexpected_dead else "")),
            ("lost", f"{self.lost}", "must be 0"),
            ("ran more than once", f"{self.ran_more_than_once}",
             f"{self.explained_by_kill} after a kill, {len(self.unexplained)} unexplained"),
            ("kills made", f"{self.kills}", "SIGKILL"),
            ("database restarts", f"{self.restarts}", f"down {self.downtime:.1f} s" if self.restarts else "skipped"),
            ("outage log lines", f"{self.outage_lines}", "'database connection lost', one per worker process"),
            ("tracebacks logged", f"{self.tracebacks}", "must be 0"),
            ("seconds", f"{self.seconds:.1f}", ""),
        ]
        if self.unfinished:
            rows.insert(4, ("unfinished", f"{self.unfinished}", "still waiting at the deadline"))
        lines = [f"{name:<20}{value:>10}" + (f"   ({note})" if note else "") for name, value, note in rows]
        if self.unexplained:
            lines.append(f"unexplained repeats: jobs {self.unexplained[:10]}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def _count_left(url: str, queue: str) -> tuple[int, int] | None:
    """(jobs not dead, dead jobs) of the queue, or None while the database is out of reach."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FILTER (WHERE failed_at IS NULL),"
                                " count(*) FILTER (WHERE failed_at IS NOT NULL) FROM jobs WHERE queue = %s",
                                (queue,)).fetchone()
    except psycopg.OperationalError:
        return None


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


def _age(pid: int) -> float:
    import psutil

    try:
        return time.time() - psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def run(url: str, *, jobs: int, minutes: float, processes: int = 4, concurrency: int = 8, fail_rate: float = 0.01,
        job_ms: float = 20.0, kill_every: float = 3.0, lock_timeout: float = 5.0, server: ThrowawayServer | None = None,
        restart_at: float = 0.4, seed: int | None = None, say=print) -> Report:
    """One chaos run against `url`; `server` (if given) is the one to restart. Returns the report."""
    from . import migrate

    rng = random.Random(seed)
    report = Report(enqueued=jobs)
    queue = f"chaos-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    migrate(url)
    runs_dir = tempfile.mkdtemp(prefix="dj-chaos-runs-")

    fail_ids: set[int] = set()
    with psycopg.connect(url) as conn:
        for start in range(0, jobs, 10_000):
            flags = [rng.random() < fail_rate for _ in range(min(10_000, jobs - start))]
            ok = [{"ms": job_ms} for f in flags if not f]
            bad = [{"fail": True, "ms": job_ms} for f in flags if f]
            work.using(queue=queue, conn=conn).enqueue_many(ok)
            fail_ids.update(work.using(queue=queue, conn=conn, max_attempts=1).enqueue_many(bad))
            conn.commit()
        all_ids = {r[0] for r in conn.execute("SELECT id FROM jobs WHERE queue = %s", (queue,))}
    report.meant_to_fail = len(fail_ids)
    say(f"enqueued {jobs} jobs on queue {queue} ({len(fail_ids)} meant to fail); runs logged in {runs_dir}")

    log_path = os.path.join(runs_dir, "workers.log")
    env = {**os.environ, RUNS_DIR_ENV: runs_dir, "DJ_DATABASE_URL": url,
           "DJ_TASKS": ",".join(filter(None, [os.environ.get("DJ_TASKS"), "dj.chaos"]))}
    with open(log_path, "w") as log_file:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "dj", "work", "--queues", queue, "--processes", str(processes),
             "--concurrency", str(concurrency), "--lock-timeout", str(lock_timeout)],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    killed: set[int] = set()
    deadline = started + minutes * 60
    next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
    last_say = 0.0
    left = (jobs, 0)
    try:
        while time.monotonic() < deadline:
            counted = _count_left(url, queue)
            left = counted or left
            if counted is not None and counted[0] == 0:
                break
            done = jobs - left[0] - left[1]
            if server is not None and not report.restarts and done >= restart_at * jobs:
                say(f"restarting PostgreSQL with {done} of {jobs} jobs finished")
                down = time.monotonic()
                server.stop()
                server.start()
                report.restarts, report.downtime = 1, time.monotonic() - down
            if time.monotonic() >= next_kill:
                # A random worker among those up for a few seconds, so that the pool keeps working.
                candidates = [p for p in _children(supervisor.pid) if _age(p) > 3.0]
                if candidates:
                    victim = rng.choice(candidates)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        killed.add(victim)
                        report.kills += 1
                    except ProcessLookupError:
                        pass
                next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
            if time.monotonic() - last_say > 5:
                last_say = time.monotonic()
                say(f"{time.monotonic() - started:6.1f} s: {done} of {jobs} finished, {report.kills} kills")
            if supervisor.poll() is not None:
                say(f"the supervisor exited with {supervisor.returncode}; see {log_path}")
                break
            time.sleep(0.25)
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
        for pid in _children(supervisor.pid):
            os.kill(pid, signal.SIGKILL)
    report.seconds = time.monotonic() - started

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT id, failed_at IS NOT NULL FROM jobs WHERE queue = %s", (queue,)).fetchall()
        conn.execute("DELETE FROM jobs WHERE queue = %s", (queue,))
    by_job = read_runs(runs_dir)
    remaining = {job_id for job_id, _ in rows}
    dead = {job_id for job_id, is_dead in rows if is_dead}
    report.dead = len(dead)
    report.unexpected_dead = len(dead - fail_ids)
    report.unfinished = len(remaining - dead)
    gone = all_ids - remaining
    report.succeeded = len(gone)
    # A job whose row is gone must have finished a run: else it was lost.
    report.lost = sum(1 for job_id in gone if not any(r.finished for r in by_job.get(job_id, ())))
    for job_id, job_runs in by_job.items():
        if len(job_runs) > 1:
            report.ran_more_than_once += 1
            if all(r.pid in killed for r in job_runs[:-1]):
                report.explained_by_kill += 1
            else:
                report.unexplained.append(job_id)
    worker_log = Path(log_path).read_text(errors="replace")
    report.outage_lines = worker_log.count("database connection lost")
    report.tracebacks = worker_log.count("Traceback")
    if report.ok:
        shutil.rmtree(runs_dir, ignore_errors=True)
    else:
        say(f"kept the run logs and the workers' log in {runs_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dj.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=15.0, help="give up (and fail) after this long")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fail-rate", type=float, default=0.01)
    parser.add_argument("--job-ms", type=float, default=20.0, help="how long a job sleeps, on average")
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills, on average")
    parser.add_argument("--lock-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database-url", default=None,
                        help="use this server (on a queue of its own) instead of a throwaway one; no restart")
    args = parser.parse_args(argv)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    server = None if args.database_url else ThrowawayServer(prefix="dj-chaos-")
    try:
        url = args.database_url or server.url
        report = run(url, jobs=args.jobs, minutes=args.minutes, processes=args.processes,
                     concurrency=args.concurrency, fail_rate=args.fail_rate, job_ms=args.job_ms,
                     kill_every=args.kill_every, lock_timeout=args.lock_timeout, server=server, seed=args.seed,
                     say=say)
    finally:
        if server is not None:
            server.destroy()
    print(f"dj chaos: {args.jobs} jobs, {args.processes} processes x {args.concurrency} threads, "
          f"SIGKILL every ~{args.kill_every:g} s, lock timeout {args.lock_timeout:g} s")
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
