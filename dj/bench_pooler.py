"""`dj bench`, section "through PgBouncer": the drain and the pickup latency with a real PgBouncer
in transaction mode between the workers and the configured server, beside the direct figures of
the same run.

The bench starts its own PgBouncer (Debian's `pgbouncer`, `PgBouncer` below; the tests use it
too): its own ini and userlist in a temporary directory, a free port of 127.0.0.1, every database
name forwarded to the configured server (TCP or unix socket), trust authentication towards the
client, and the URL's password, if any, towards the server.

- drain: direct and pooled worker pools run side by side on queues of their own, and their drains
  alternate, ROUNDS each, so both meet the same machine; the figure is the ratio of the medians.
- pickup: enqueue-to-start latency through PgBouncer, polling (no DJ_LISTEN_URL) and with
  DJ_LISTEN_URL set to the direct URL (LISTEN), measured as the main latency figure is.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import conninfo

POOL_SIZE = 20  # PgBouncer's own default_pool_size: what a stock installation has
GOAL = 0.7  # drain through PgBouncer >= 70% of the direct drain (issue 12)


class Unavailable(Exception):
    """PgBouncer is not installed, or would not start; the message says why."""


def _binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as(host: str) -> str | None:
    """PgBouncer refuses to run as root. As root, run it as the owner of the server's socket
    directory (the embedded server's data directory is private to its own OS user), else as
    postgres or nobody; as anyone else, as oneself (None)."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/") and os.path.isdir(host):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    raise Unavailable("running as root and no user to run pgbouncer as (it refuses to run as root)")


class PgBouncer:
    """A real PgBouncer in front of the server of `server_url`, until stop()."""

    def __init__(self, server_url: str, *, mode: str = "transaction", pool_size: int = POOL_SIZE):
        binary = _binary()
        if binary is None:
            raise Unavailable("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        params = {k: str(v) for k, v in conninfo.conninfo_to_dict(server_url).items()}
        self.server = params
        self.user = params.get("user") or pwd.getpwuid(os.geteuid()).pw_name
        host = params.get("host") or "/var/run/postgresql"
        self.mode, self.pool_size, self.port = mode, pool_size, _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"dj-pgbouncer-{mode}-"))
        self.log = self.dir / "pgbouncer.log"
        password = (params.get("password") or "").replace('"', '""')
        (self.dir / "userlist.txt").write_text(f'"{self.user}" "{password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n* = host={host} port={params.get('port') or 5432}\n\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir}/userlist.txt\npool_mode = {mode}\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 1000\nlogfile = {self.log}\n"
            f"pidfile = {self.dir}/pgbouncer.pid\nignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\nlog_disconnections = 0\n")
        user = _run_as(host)
        if user is not None:
            os.chmod(self.dir, 0o755)
            for path in [self.dir, *self.dir.iterdir()]:
                shutil.chown(path, user)
        # Its log goes to the log file; stderr too, which must not be a pipe nobody reads: once the
        # pipe's buffer is full, PgBouncer blocks writing to it and stops serving.
        self.stderr = self.dir / "stderr.log"
        with open(self.stderr, "wb") as err:
            self.process = subprocess.Popen([binary, *(["-u", user] if user else []), str(self.dir / "pgbouncer.ini")],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def url(self, dbname: str | None = None) -> str:
        """The URL of database `dbname` (default: the server URL's) through this PgBouncer."""
        password = self.server.get("password")
        auth = quote(self.user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(dbname or self.server.get('dbname') or self.user)}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise Unavailable(f"pgbouncer exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                if time.monotonic() > deadline:
                    raise Unavailable(f"pgbouncer did not answer within 15 s ({str(exc).strip()}): "
                                      f"{self.log_tail()}") from None
            time.sleep(0.1)

    def log_tail(self, lines: int = 3) -> str:
        text = "".join(p.read_text(errors="replace") for p in (self.log, self.stderr) if p.exists())
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(bench: Any, worker_pool: Callable[..., Any], rounds: int) -> dict[str, Any]:
    """The section's figures. `bench` is dj.bench's _Bench (its URL, drains and latency run),
    `worker_pool` its pool of `dj work` processes, `rounds` the number of drains a figure is the
    median of."""
    try:
        bouncer = PgBouncer(bench.url)
    except Unavailable as exc:
        bench.notes.append(f"through PgBouncer: not measured ({exc})")
        return {"skipped": str(exc)}
    try:
        dbname = conninfo.conninfo_to_dict(bench.url).get("dbname")
        pooled_url = bouncer.url(str(dbname) if dbname is not None else None)
        p, n = max(bench.processes), bench.jobs
        q_direct, q_pooled = bench.queue("pgb-direct"), bench.queue("pgb-pooled")
        direct, pooled = [], []
        with worker_pool(bench.url, [q_direct], p) as dpool, worker_pool(pooled_url, [q_pooled], p) as ppool:
            bench.fill_and_drain(dpool, q_direct, min(n, 500))  # warm-up
            bench.fill_and_drain(ppool, q_pooled, min(n, 500))
            for _ in range(rounds):
                direct.append(bench.fill_and_drain(dpool, q_direct, n))
                pooled.append(bench.fill_and_drain(ppool, q_pooled, n))
        bench.steps.start("latency through PgBouncer: polling, then with DJ_LISTEN_URL")
        q = bench.queue("pgb-poll")
        with worker_pool(pooled_url, [q], 1, env={"DJ_LISTEN_URL": ""}) as pool:
            polling = bench.latency(pool, q)
        q = bench.queue("pgb-listen")
        with worker_pool(pooled_url, [q], 1, env={"DJ_LISTEN_URL": bench.url}) as pool:
            listening = bench.latency(pool, q)
    finally:
        bouncer.stop()
    d, b = statistics.median(direct), statistics.median(pooled)
    return {"processes": p, "pool_mode": "transaction", "default_pool_size": POOL_SIZE,
            "drain_direct_per_s": d, "drain_pooled_per_s": b, "ratio": b / d if d else None,
            "drain_direct_rounds": direct, "drain_pooled_rounds": pooled,
            "latency_polling_ms": polling, "latency_listen_url_ms": listening}


def add_rows(t: Any, doc: dict[str, Any], n: Any, mark: Any) -> None:
    """The section's rows in `dj bench`'s table."""
    s = doc.get("pgbouncer")
    if not s or "skipped" in s:
        return
    ratio = s.get("ratio")
    t.add_row(f"drain through PgBouncer / direct, {s['processes']} proc.",
              f"{n(s['drain_pooled_per_s'])} / {n(s['drain_direct_per_s'])}",
              f">= {GOAL:.0%} ({ratio:.0%})" if ratio is not None else f">= {GOAL:.0%}",
              mark(None if ratio is None else ratio >= GOAL))
    for label, key in (("polling", "latency_polling_ms"), ("DJ_LISTEN_URL", "latency_listen_url_ms")):
        lat = s[key]
        if lat.get("p50") is not None and lat.get("p99") is not None:
            t.add_row(f"pickup through PgBouncer, {label}: p50/p99", f"{lat['p50']:.1f} / {lat['p99']:.1f} ms", "", "")
