"""The `dj` command: a thin Typer layer over dj's Python API and the workload in tasks/."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Optional

import psycopg
import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from . import admin, db, embedded, logs, task as task_mod
from .errors import DJError, WorkFailed
from .supervisor import run_workers

app = typer.Typer(help="dj: a PostgreSQL-backed job queue (DelayedJob, done right).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
enqueue_app = typer.Typer(help="Put jobs on a queue.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and manage individual jobs.", no_args_is_help=True)
db_app = typer.Typer(help="Control dj's embedded PostgreSQL server.", no_args_is_help=True)
counters_app = typer.Typer(help="The workload's counter caches.", no_args_is_help=True)
app.add_typer(enqueue_app, name="enqueue")
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
app.add_typer(counters_app, name="counters")
queue_app = typer.Typer(help="Pause, resume and limit queues (stored in the database, for every worker).",
                        no_args_is_help=True)
batch_app = typer.Typer(help="Batches of jobs with a callback.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
app.add_typer(batch_app, name="batch")
cron_app = typer.Typer(help="Jobs that workers enqueue on a schedule: @job(cron=...).", no_args_is_help=True)
app.add_typer(cron_app, name="cron")

out = Console()

DatabaseUrl = Annotated[Optional[str], typer.Option(
    "--database-url", help="PostgreSQL URL; wins over DJ_DATABASE_URL. Default: the embedded server.",
    show_default=False)]
Queue = Annotated[Optional[str], typer.Option("--queue", "-q", help="Queue name (default: the task's).")]
Priority = Annotated[Optional[int], typer.Option("--priority", "-p", help="Lower runs first (default: the task's).")]


def _use(database_url: str | None) -> None:
    db.use_database(database_url)
    if database_url:
        # And for every process the command starts (workers, the demo's), and the jobs they run:
        # a job's own dj.transaction() must reach the database its worker claimed it from.
        os.environ["DJ_DATABASE_URL"] = database_url


def _connect(database_url: str | None) -> psycopg.Connection:
    """An autocommit connection to a database that has dj's schema."""
    _use(database_url)
    conn = db.connect(autocommit=True)
    db.ensure_schema(conn)
    return conn


def _json_value(text: str, kind: type, flag: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DJError(f"{flag} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, kind):
        raise DJError(f"{flag} must be a JSON {'array' if kind is list else 'object'}, got {type(value).__name__}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise DJError(f"--in {text!r} is not a duration like 30s, 5m, 2h or 1d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise DJError(f"--at {text!r} is not an ISO 8601 time such as 2026-01-31T09:00:00+00:00") from None
    return when if when.tzinfo else when.astimezone()


# --- migrate, enqueue ---------------------------------------------------------------------------

@app.command()
def migrate(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade dj's schema (alembic upgrade head). Safe to run again."""
    _use(database_url)
    from . import schema  # Alembic is heavy; only this command needs it

    head = schema.migrate()
    out.print(f"schema is at {head}")


@enqueue_app.command("job")
def enqueue_job(
    name: Annotated[str, typer.Argument(help="Registered task name, e.g. tasks.demo.noop")],
    args: Annotated[str, typer.Option("--args", help="Positional arguments as a JSON array.")] = "[]",
    kwargs: Annotated[str, typer.Option("--kwargs", help="Keyword arguments as a JSON object.")] = "{}",
    queue: Queue = None,
    priority: Priority = None,
    in_: Annotated[Optional[str], typer.Option("--in", help="Run after a delay: 30s, 5m, 2h, 1d.")] = None,
    at: Annotated[Optional[str], typer.Option("--at", help="Run at an ISO 8601 time.")] = None,
    after: Annotated[Optional[str], typer.Option(
        "--after", help="Run once these jobs have succeeded: comma-separated job ids.")] = None,
    after_batch: Annotated[Optional[str], typer.Option(
        "--after-batch", help="Run once these batches have succeeded: comma-separated batch ids.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue one job of a registered task."""
    task_mod.load_task_modules()
    positional = _json_value(args, list, "--args")
    keywords = _json_value(kwargs, dict, "--kwargs")
    if in_ is not None and at is not None:
        raise DJError("give either --in or --at, not both")
    options: dict[str, Any] = {}
    if queue is not None:
        options["queue"] = queue
    if priority is not None:
        options["priority"] = priority
    if in_ is not None:
        try:
            options["run_at"] = datetime.now(timezone.utc) + timedelta(seconds=parse_duration(in_))
        except OverflowError:
            raise DJError(f"--in {in_!r} is too far in the future") from None
    if at is not None:
        options["run_at"] = parse_time(at)
    if after is not None or after_batch is not None:
        from .dependencies import BatchRef

        options["after"] = [*_ids(after, "--after"), *(BatchRef(i) for i in _ids(after_batch, "--after-batch"))]
    if task_mod.lookup(name) is None:
        raise DJError(f"unknown task {name!r}; see the registered tasks with 'dj jobs tasks'")
    _connect(database_url).close()
    try:
        job_id = task_mod.enqueue(name, positional, keywords, **options)
    except (TypeError, ValueError, LookupError) as exc:
        raise DJError(str(exc)) from None
    out.print(f"enqueued job {job_id} ({escape(name)})")


def _ids(text: str | None, option: str) -> list[int]:
    try:
        return [int(part) for part in (text or "").split(",") if part.strip()]
    except ValueError:
        raise DJError(f"{option} takes comma-separated ids, e.g. {option} 12,13") from None


@enqueue_app.command("seed")
def enqueue_seed(
    users: Annotated[int, typer.Option(help="Users to create.")] = 100,
    items: Annotated[int, typer.Option(help="Items to create.")] = 500,
    orders: Annotated[int, typer.Option(help="Orders to create (1 to 6 items each).")] = 100,
    questions: Annotated[int, typer.Option(help="Questions to create.")] = 0,
    answers: Annotated[int, typer.Option(help="Answers to create.")] = 0,
    per_job: Annotated[Optional[int], typer.Option(
        "--per-job", help="Records per job: 1 = one job per record; default one big job per generator.")] = None,
    slow: Annotated[bool, typer.Option("--slow", help="Each record waits 0.02-0.5 s, like the tutorial.")] = False,
    queue: Annotated[str, typer.Option("--queue", "-q")] = "default",
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue seeding jobs for the storefront and the Q&A board."""
    from tasks import seed

    _connect(database_url).close()
    summary = seed.enqueue_seed(users=users, items=items, orders=orders, questions=questions, answers=answers,
                                per_job=per_job, slow=slow, queue=queue)
    table = Table("generator", "records", "jobs", title="seeding jobs enqueued")
    for gen, info in summary.items():
        table.add_row(gen, str(info["records"]), str(info["jobs"]))
    out.print(table)


@enqueue_app.command("rebuild-counters")
def enqueue_rebuild_counters(
    batch: Annotated[int, typer.Option(help="Ids per job.")] = 1000,
    table: Annotated[str, typer.Option(help="Table whose counters to rebuild, or 'all'.")] = "all",
    queue: Annotated[str, typer.Option("--queue", "-q")] = "default",
    priority: Annotated[int, typer.Option("--priority", "-p")] = 0,
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue counter-cache rebuilds: one job for every BATCH ids of each table."""
    from tasks import counters

    _connect(database_url).close()
    ranges = counters.enqueue_rebuild(batch, table=table, queue=queue, priority=priority)
    if not ranges:
        out.print("nothing to rebuild")
        return
    by_table: dict[str, list[tuple[int, int]]] = {}
    for name, first, last in ranges:
        by_table.setdefault(name, []).append((first, last))
    summary = Table("table", "jobs", "id ranges", title=f"enqueued {len(ranges)} rebuild jobs")
    for name, spans in by_table.items():
        shown = ", ".join(f"{a}-{b}" for a, b in spans[:3]) + (f", ... {spans[-1][0]}-{spans[-1][1]}"
                                                              if len(spans) > 3 else "")
        summary.add_row(name, str(len(spans)), shown)
    out.print(summary)
    out.print(f"batch {ranges.batch_id}: when the last job finishes, a callback checks every counter "
              f"(see 'dj batch show {ranges.batch_id}')")


@enqueue_app.command("mail")
def enqueue_mail(
    email: Annotated[str, typer.Option("--email", help="Recipient address (checked at enqueue).")],
    thought: Annotated[str, typer.Option("--thought", help="The random thought the email is about.")],
    queue: Queue = None,
    priority: Priority = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue the work-it randomness email (sent over SMTP to DJ_SMTP_URL, default localhost:1025)."""
    from tasks import mail

    address = mail.validate_address(email)
    options = {k: v for k, v in (("queue", queue), ("priority", priority)) if v is not None}
    _connect(database_url).close()
    try:
        job_id = mail.enqueue_mail(address, thought, **options)
    except (TypeError, ValueError) as exc:
        raise DJError(str(exc)) from None
    out.print(f"enqueued job {job_id} (mail.send_randomness_email to {escape(address)})")


# --- work ---------------------------------------------------------------------------------------

@app.command()
def work(
    queues: Annotated[str, typer.Option("--queues", help="Comma-separated queues to work.")] = "default",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Threads per process.", min=1)] = 8,
    processes: Annotated[int, typer.Option("--processes", "-P", help="Worker processes.", min=1)] = 1,
    async_concurrency: Annotated[int, typer.Option(
        "--async-concurrency", help="Async jobs (@job on an async def) in flight at once per process, on its "
        "event loop.", min=1)] = 100,
    prefetch: Annotated[Optional[int], typer.Option(
        "--prefetch", help="Jobs claimed ahead of free threads, so one round trip serves many jobs "
        "\\[default: the concurrency].", min=0)] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit once no ready job is left (jobs:workoff).")] = False,
    min_priority: Annotated[Optional[int], typer.Option(
        "--min-priority", help="Claim only jobs with at least this priority.")] = None,
    max_priority: Annotated[Optional[int], typer.Option(
        "--max-priority", help="Claim only jobs with at most this priority.")] = None,
    lock_timeout: Annotated[Optional[float], typer.Option(
        "--lock-timeout", help="Seconds without a heartbeat before a worker's jobs are reclaimed "
        "\\[env DJ_LOCK_TIMEOUT; default 300].")] = None,
    shutdown_timeout: Annotated[float, typer.Option("--shutdown-timeout",
                                                    help="Seconds to let running jobs finish on SIGTERM.")] = 25.0,
    default_timeout: Annotated[Optional[float], typer.Option(
        "--default-timeout", help="Seconds a job may run when its task sets no timeout.")] = None,
    poll_interval: Annotated[Optional[float], typer.Option(
        "--poll-interval", help="Seconds between polls when idle: a claim every 5 s where NOTIFY wakes "
        "workers sooner; behind a transaction pooler without a listen URL, a probe of the claim index every "
        "0.1 s.", show_default=False)] = None,
    listen_url: Annotated[Optional[str], typer.Option(
        "--listen-url", help="A direct URL to the same database, used only to LISTEN, for instant wake-up "
        "when the database URL goes through a transaction pooler \\[env DJ_LISTEN_URL].", show_default=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every job's start and end.")] = False,
    log_format: Annotated[str, typer.Option("--log-format", help="text, or json: one object per event "
                                            "(job started/succeeded/failed/dead with duration).")] = "text",
    database_url: DatabaseUrl = None,
) -> None:
    """Run workers until SIGTERM/SIGINT (or, with --burst, until the queues are drained)."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    if not names:
        raise DJError("--queues needs at least one queue name")
    if min_priority is not None and max_priority is not None and min_priority > max_priority:
        raise DJError(f"--min-priority {min_priority} is greater than --max-priority {max_priority}")
    for flag, value in (("--lock-timeout", lock_timeout), ("--default-timeout", default_timeout),
                        ("--poll-interval", poll_interval)):
        if value is not None and value <= 0:
            raise DJError(f"{flag} must be positive")
    if log_format not in ("text", "json"):
        raise DJError("--log-format must be text or json")
    logs.configure(logging.DEBUG if verbose else logging.INFO, log_format)
    task_mod.load_task_modules()
    _connect(database_url).close()
    show_progress = burst and sys.stdout.isatty()
    with _BurstProgress(names) if show_progress else contextlib.nullcontext():
        code = run_workers(processes=processes, burst=burst, queues=names, concurrency=concurrency, prefetch=prefetch,
                           min_priority=min_priority, max_priority=max_priority, lock_timeout=lock_timeout,
                           shutdown_timeout=shutdown_timeout, default_timeout=default_timeout,
                           poll_interval=poll_interval, database_url=db.database_url(), listen_url=listen_url,
                           log_jobs=verbose or log_format == "json", async_concurrency=async_concurrency)
    raise typer.Exit(code)


class _BurstProgress:
    """A progress bar of the jobs left in the worker's queues, while `dj work --burst` drains them."""

    def __init__(self, queues: list[str]):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.queues = queues
        self.conn = db.connect(autocommit=True)
        self.progress = Progress(TextColumn("draining {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=out, transient=False)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        first = admin.pending(self.conn, self.queues)
        bar = self.progress.add_task(",".join(self.queues), total=max(first, 1))
        while True:
            stopping = self.stop.wait(0.5)
            left = admin.pending(self.conn, self.queues)
            self.progress.update(bar, completed=max(0, first - left), total=max(first, 1))
            if stopping:
                return

    def __enter__(self) -> "_BurstProgress":
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(5)
        self.progress.stop()
        self.conn.close()


# --- status and jobs ----------------------------------------------------------------------------

_STATUS_COLUMNS = ("ready", "scheduled", "running", "retrying", "dead", "waiting")


def _status_table(doc: dict[str, Any]) -> Table | Group:
    table = Table("queue", "ready", "scheduled", "running", "retrying", "dead", "waiting", "oldest ready",
                  title="dj status", caption=(
                      f"{doc['throughput']['succeeded_last_minute']} succeeded, "
                      f"{doc['throughput']['failed_last_minute']} failed in the last minute; "
                      f"{len(doc['workers'])} worker(s); oldest snapshot: {_snapshot_note(doc['oldest_snapshot'])}"))
    for name, q in doc["queues"].items():
        table.add_row(escape(name), *(str(q[k]) for k in _STATUS_COLUMNS),
                      f"{q['oldest_ready_age_s']:.1f}s")
    t = doc["totals"]
    table.add_row("[bold]total", *(f"[bold]{t[k]}" for k in _STATUS_COLUMNS),
                  "")
    if not doc.get("keys_at_limit"):
        return table
    keys = Table("key at its limit", "queue", "running", "limit", "ready, held back", title="per-key limits")
    for k in doc["keys_at_limit"]:
        keys.add_row(escape(k["key"]), escape(k["queue"]), str(k["running"]), str(k["limit"]), str(k["held"]))
    return Group(table, keys)


def _snapshot_note(snap: dict[str, Any] | None) -> str:
    if snap is None:
        return "none"
    from . import snapshot

    text = escape(snapshot.describe(snap))
    return f"[bold red]{text}[/bold red]" if snap["age_s"] >= snapshot.warn_after() else text


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status document as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every second until Ctrl-C.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Show jobs per queue and state, workers and throughput."""
    conn = _connect(database_url)
    if as_json:
        print(json.dumps(admin.status(conn), indent=2))
        return
    if not watch:
        doc = admin.status(conn)
        out.print(_status_table(doc))
        kept = doc["succeeded"]
        if kept["total"]:  # successes kept with keep= (dj jobs list --state succeeded)
            out.print(f"succeeded (kept): {'~' if kept['estimated'] else ''}{kept['total']} ("
                      + ", ".join(f"{escape(q)} {n}" for q, n in sorted(kept["queues"].items())) + ")")
        for r in doc["rate_limits"]:
            out.print(f"rate limit of {r['scope']} {r['name']}: {r['rate']}, {r['used']} used in the current window",
                      markup=False, soft_wrap=True)
        running = admin.running_progress(conn)
        if running:
            table = Table("job", "task", "worker", "progress", "message", title="progress of running jobs")
            for r in running:
                table.add_row(str(r["id"]), r["task"], r["locked_by"], f"{100 * (r['fraction'] or 0):.0f}%",
                              r["message"] or "")
            out.print(table)
        return
    from rich.live import Live

    try:
        with Live(_status_table(admin.status(conn)), console=out, refresh_per_second=4) as live:
            while True:
                time.sleep(1)
                live.update(_status_table(admin.status(conn)))
    except KeyboardInterrupt:
        pass


@jobs_app.command("list")
def jobs_list(
    state: Annotated[Optional[str], typer.Option(
        "--state", help="ready, scheduled, running, dead, waiting, or succeeded (successes kept with keep=).")] = None,
    queue: Annotated[Optional[str], typer.Option("--queue", "-q")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Only this task (a % matches any text).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="Rows to show.")] = 50,
    database_url: DatabaseUrl = None,
) -> None:
    """List jobs, oldest first."""
    if state is not None and state not in admin.LIST_STATES:
        raise DJError(f"unknown state {state!r}; choose one of {', '.join(admin.LIST_STATES)}")
    rows = admin.list_jobs(_connect(database_url), state=state, queue=queue, limit=limit, task=task)
    if state == "succeeded":
        table = Table("id", "queue", "task", "attempts", "finished", "run time", "result")
        for r in rows:
            shown = json.dumps(r["result"]) if r["result_error"] is None else f"(not kept: {r['result_error']})"
            table.add_row(str(r["id"]), escape(r["queue"]), escape(r["task"]), str(r["attempts"]),
                          f"{r['finished_at']:%Y-%m-%d %H:%M:%S}", f"{r['run_seconds']:.3f}s", escape(shown[:60]))
        out.print(table)
        return
    table = Table("id", "state", "queue", "pri", "task", "attempts", "run_at", "last error")
    for r in rows:
        error = (r["last_error"] or "").strip().splitlines()
        # Queue, task and error are user text: "[/]" in them must print as is, not as rich markup.
        table.add_row(str(r["id"]), r["state"], escape(r["queue"]), str(r["priority"]), escape(r["task"]),
                      f"{r['attempts']}/{r['max_attempts']}",
                      "-" if r["run_at"] is None else f"{r['run_at']:%Y-%m-%d %H:%M:%S}",
                      escape(error[-1][:60]) if error else "", )
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[int, typer.Argument(metavar="ID")], database_url: DatabaseUrl = None) -> None:
    """Show every field of one job, including its last error."""
    row = admin.get_job(_connect(database_url), job_id)
    for key, value in row.items():
        if key in ("args", "kwargs", "result"):
            value = json.dumps(value)
        elif key == "waits_for":
            value = ", ".join(f"job {d['job']} ({d['state']})" if "job" in d else f"batch {d['batch']} ({d['state']})"
                              for d in value) or "nothing"
        elif key == "run_at" and value is None:
            value = "when the jobs it waits for have succeeded"
        out.print(f"[bold]{key}[/bold]: ", end="")
        out.print(str(value), markup=False, highlight=False)


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[Optional[int], typer.Argument(metavar="ID")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Retry every dead job.")] = False,
    queue: Annotated[Optional[str], typer.Option("--queue", "-q", help="With --dead: only this queue.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Make a dead or waiting job ready now (or all dead jobs with --dead)."""
    if (job_id is None) == (not dead):
        raise DJError("give a job ID or --dead")
    conn = _connect(database_url)
    if dead:
        out.print(f"retrying {admin.retry_dead(conn, queue)} dead job(s)")
    else:
        admin.retry(conn, job_id)
        out.print(f"job {job_id} is ready")


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[int, typer.Argument(metavar="ID")], database_url: DatabaseUrl = None) -> None:
    """Delete a job that is not running."""
    admin.cancel(_connect(database_url), job_id)
    out.print(f"job {job_id} cancelled")


@jobs_app.command("tasks")
def jobs_tasks() -> None:
    """List the registered task names."""
    task_mod.load_task_modules()
    for name, t in sorted(task_mod.registered().items()):
        out.print(f"{name}  queue={t.options.queue} priority={t.options.priority}", markup=False)


@queue_app.command("pause")
def queue_pause(name: Annotated[str, typer.Argument(help="Queue name.")], database_url: DatabaseUrl = None) -> None:
    """Stop workers claiming from a queue (running jobs finish)."""
    admin.pause_queue(_connect(database_url), name)
    out.print(f"queue {name} paused", markup=False)


@queue_app.command("resume")
def queue_resume(name: Annotated[str, typer.Argument(help="Queue name.")], database_url: DatabaseUrl = None) -> None:
    """Let workers claim from a paused queue again."""
    admin.resume_queue(_connect(database_url), name)
    out.print(f"queue {name} resumed", markup=False)


@queue_app.command("limit")
def queue_limit(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    limit: Annotated[Optional[int], typer.Argument(help="Most running jobs across all workers; omit to remove.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Cap how many jobs of a queue run at once, across all workers and hosts."""
    admin.set_concurrency_limit(_connect(database_url), name, limit)
    out.print(f"queue {name}: " + (f"at most {limit} running" if limit is not None else "no limit"), markup=False)


@queue_app.command("rate")
def queue_rate(
    name: Annotated[str, typer.Argument(help="Queue name.")],
    rate: Annotated[str, typer.Argument(metavar="RATE", help="N/s, N/min or N/h (e.g. 100/min), or off.")],
    database_url: DatabaseUrl = None,
) -> None:
    """Cap how many jobs of a queue start in any window of a second, minute or hour, across all
    workers and hosts. Jobs held back stay ready, in their place."""
    from . import rates

    set_to = rates.set_queue_rate(_connect(database_url), name, rate)
    out.print(f"queue {name}: " + (f"at most {set_to} starts" if set_to is not None else "no rate limit"),
              markup=False)


@batch_app.command("show")
def batch_show(batch_id: Annotated[int, typer.Argument(metavar="ID")], database_url: DatabaseUrl = None) -> None:
    """Show a batch's progress and its callback's result."""
    from . import batches as batch_mod

    row = batch_mod.show(_connect(database_url), batch_id)
    if row is None:
        raise DJError(f"no batch {batch_id}")
    total = row["total"]
    done = row["succeeded"] + row["dead"]
    state = "open" if total is None else "finished" if row["finished_at"] else "running"
    out.print(f"batch {row['id']} ({state}): {done}/{total if total is not None else '?'} done, "
              f"{row['succeeded']} succeeded, {row['dead']} dead; callback {row['on_complete'] or '-'}",
              markup=False)
    if row["result"] is not None:
        out.print(f"result: {json.dumps(row['result'])}", markup=False)


# --- cron ---------------------------------------------------------------------------------------

@cron_app.command("list")
def cron_list(database_url: DatabaseUrl = None) -> None:
    """List the cron jobs: expression (UTC), next run, last tick enqueued and its job."""
    from . import cron

    task_mod.load_task_modules()
    conn = _connect(database_url)
    now = conn.execute("SELECT now()").fetchone()[0]
    runs = cron.last_runs(conn)
    scheduled = cron.schedule(now)
    if not scheduled:
        out.print("no cron jobs registered (@job(cron=...) in tasks/ or the modules in DJ_TASKS)")
        return
    table = Table(title="cron jobs (times in UTC)")
    for heading in ("name", "expression", "queue"):
        table.add_column(heading, overflow="fold")  # never cut a name short
    for heading in ("next run", "last tick", "last job"):
        table.add_column(heading)
    for s in scheduled:
        run = runs.get(s.name, {})
        last = run.get("last_tick")
        last_text = "-" if last is None else f"{cron.utc(last):%Y-%m-%d %H:%M:%S}"
        if last is not None and run.get("last_job_id") is None:
            last_text += " (first seen)"
        table.add_row(escape(s.name), escape(s.expr), escape(task_mod.lookup(s.name).options.queue),
                      f"{s.next_run:%Y-%m-%d %H:%M:%S}", last_text, str(run.get("last_job_id") or "-"))
    out.print(table)


# --- the workload -------------------------------------------------------------------------------

@counters_app.command("check")
def counters_check(database_url: DatabaseUrl = None) -> None:
    """Compare every counter cache with the real rows; exit 1 if any is wrong."""
    from tasks import counters

    mismatches = counters.check(_connect(database_url))
    if not mismatches:
        out.print("all counters correct")
        return
    table = Table("table", "id", "column", "cached", "actual", title=f"{len(mismatches)} wrong counter(s)")
    for m in mismatches[:50]:
        table.add_row(m["table"], str(m["id"]), m["column"], str(m["cached"]), str(m["actual"]))
    out.print(table)
    raise typer.Exit(1)


@app.command()
def demo(
    what: Annotated[str, typer.Argument(help="workload: seeding, rebuilds, rebuilds under live writes; "
                                             "work-it: the tutorials' web app, mail in the request vs enqueued.")
                    ] = "workload",
    scale: Annotated[str, typer.Option(help="workload: small, default or large.")] = "default",
    forms: Annotated[int, typer.Option(help="work-it: forms to post per mode.", min=1)] = 200,
    clients: Annotated[int, typer.Option(help="work-it: concurrent clients.", min=1)] = 10,
    database_url: DatabaseUrl = None,
) -> None:
    """Run the whole workload end to end, or the work-it app, and print the timings."""
    from tasks import demo as demo_mod

    _use(database_url)
    if what == "work-it":
        demo_mod.run_work_it(forms=forms, clients=clients, console=out)
    elif what == "workload":
        demo_mod.run(scale=scale, console=out)
    else:
        raise DJError(f"unknown demo {what!r}; choose workload or work-it")


# --- the embedded server ------------------------------------------------------------------------

@db_app.command("start")
def db_start() -> None:
    """Start the embedded server (or find it running) and print its URL."""
    print(embedded.start())


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    out.print("stopped" if embedded.stop() else "not running")


@db_app.command("url")
def db_url(database_url: DatabaseUrl = None) -> None:
    """Print the URL dj uses: --database-url/DJ_DATABASE_URL, else the embedded server's."""
    _use(database_url)
    print(db.database_url())


# --- doctor -------------------------------------------------------------------------------------

@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as one JSON object.")] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Check the configured server for what dj needs: exit 0 all OK, 1 any WARN, 2 cannot check."""
    from . import doctor as doctor_mod

    _use(database_url)
    report = doctor_mod.run()
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        for line in doctor_mod.lines(report):
            out.print(escape(line), soft_wrap=True, highlight=False)
    if report.status != "ok":
        raise typer.Exit(1)


# --- bench --------------------------------------------------------------------------------------

@app.command()
def bench(
    jobs: Annotated[Optional[int], typer.Option("--jobs", help="No-op jobs per drain and bulk enqueue "
                                                "\\[default: 10000; 2000 with --quick].", min=1)] = None,
    processes: Annotated[str, typer.Option("--processes", "-P", help="Most worker processes (runs 1..P), "
                                           "or a list like 1,2.")] = "2",
    peers: Annotated[bool, typer.Option("--peers", help="Also run procrastinate, pgqueuer and oban-py (Python >= 3.12) if installed "
                                        "(pip install 'djq\\[bench]').")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A small run, well under a minute.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    only: Annotated[Optional[str], typer.Option("--only", help="Measure only these sections, comma-separated: "
                                                "bulk, single, async-single, drain, keep, deps, latency, pgbouncer, soak, old-snapshot, "
                                                "fairness, rebuild, peers.")
                    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Measure drain, enqueue, latency, decay and rebuild speed on its own queues (see dj.bench)."""
    from . import bench as bench_mod

    _use(database_url)
    bench_mod.cli(jobs, processes, peers, quick, as_json, out, only=only)


# --- web ----------------------------------------------------------------------------------------

@app.command()
def web(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback needs "
                                      "a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="DJ_WEB_TOKEN", show_envvar=True, show_default=False,
        help="Require this token: 'Authorization: Bearer TOKEN' or the login page. Prefer the "
        "environment variable: a flag shows in ps.")] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Serve the web dashboard (queues, jobs, workers, actions, /metrics) until Ctrl-C."""
    from .web import serve

    serve(host=host, port=port, token=token, database_url=database_url)


def main() -> None:
    # psycopg logs "error ignored terminating <Pipeline>" when a failed enqueue leaves its pipeline;
    # with no handler configured that came out as a second stderr line before our one error line.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        _fail("aborted", 130)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `dj` or `dj jobs`: show the help
            print(exc.format_message())
            sys.exit(0)
        _fail(" ".join(exc.format_message().split()), 2)
    except DJError as exc:
        _fail(str(exc), 2)
    except WorkFailed as exc:
        _fail(str(exc), 1)
    except psycopg.Error as exc:
        _fail(f"database error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("DJ_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (set DJ_DEBUG=1 for the traceback)", 1)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
