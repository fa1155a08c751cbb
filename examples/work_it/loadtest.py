"""`dj demo work-it`: work-it's response time with the mail sent in the request, then enqueued.

It starts the mailcatcher, a mail worker (`dj work --queues mail`) and the app (uvicorn), each a
process of its own, posts N forms from C concurrent clients in each mode, and measures the
responses (p50, p95, p99, requests/s), the time until the last mail arrived, and that every
form got exactly one mail.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

import dj

ROOT = Path(__file__).resolve().parents[2]
MODES = ("inline", "queued")
WORKER_THREADS = 20  # a mail job is mostly the giphy wait: threads, not cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A child process whose output goes to a log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
            raise dj.DJError(f"work-it's {self.name} exited with code {self.proc.returncode}: {tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait_http(url: str, process: _Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        process.check()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise dj.DJError(f"work-it's {process.name} did not answer at {url} within {timeout:.0f} s")
        time.sleep(0.1)


async def _post_forms(base: str, mode: str, n: int, clients: int) -> tuple[list[float], float, float]:
    """Post n forms from `clients` concurrent clients; returns the latencies (s), the wall time
    and the moment the first post started (time.time(), to compare with the mails' arrival)."""
    latencies: list[float] = []
    todo = iter(range(n))
    run = uuid.uuid4().hex[:8]  # the app refuses a thought twice: each run's thoughts are new
    failures: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            started = time.perf_counter()
            r = await http.post(f"{base}/thoughts", data={"email": f"{mode}-{i}@work-it.example",
                                                          "thought": f"thought {i} of {mode} run {run}"})
            latencies.append(time.perf_counter() - started)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {' '.join(r.text.split())[:200]}")

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await http.get(base)  # a warm connection, as a browser that loaded the form has
        first = time.time()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    if failures:
        raise dj.DJError(f"{len(failures)} of {n} posts failed, e.g. {failures[0]}")
    return latencies, wall, first


def _mails(inbox: str, mode: str) -> list[dict[str, Any]]:
    return [m for m in httpx.get(f"{inbox}/messages.json", timeout=10).json()
            if any(to.startswith(f"{mode}-") for to in m["to"])]


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def run(forms: int = 200, clients: int = 10, modes: tuple[str, ...] = MODES, database_url: str | None = None,
        mail_timeout: float = 120.0) -> list[dict[str, Any]]:
    """Measure each mode; returns one row of figures per mode."""
    url = database_url or dj.database_url()
    dj.migrate(url)
    log_dir = Path(os.environ.get("DJ_HOME") or "/tmp") / "work-it-demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    smtp, inbox_port = _free_port(), _free_port()
    inbox = f"http://127.0.0.1:{inbox_port}"
    env = {**os.environ, "DJ_DATABASE_URL": url, "DJ_SMTP_URL": f"smtp://127.0.0.1:{smtp}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    children: list[_Process] = []
    rows = []
    try:
        catcher = _Process("mailcatcher", [sys.executable, "-m", "examples.work_it.mailcatcher", "--smtp", str(smtp),
                                           "--http", str(inbox_port)], env, log_dir)
        children.append(catcher)
        _wait_http(inbox, catcher)
        worker = _Process("worker", [sys.executable, "-m", "dj", "work", "--queues", "mail",
                                     "--concurrency", str(WORKER_THREADS)], env, log_dir)
        children.append(worker)
        for mode in modes:
            port = _free_port()
            app = _Process(f"app-{mode}", [sys.executable, "-m", "uvicorn", "examples.work_it.app:app", "--port",
                                           str(port), "--log-level", "warning"],
                           {**env, "WORK_IT_INLINE": "1" if mode == "inline" else "0"}, log_dir)
            children.append(app)
            base = f"http://127.0.0.1:{port}"
            _wait_http(base, app)
            try:
                latencies, wall, first = asyncio.run(_post_forms(base, mode, forms, clients))
            except (httpx.HTTPError, dj.DJError) as exc:
                app.check()
                raise dj.DJError(f"{mode}: posting the forms failed ({type(exc).__name__}: {exc}); "
                                 f"see {app.log}") from exc
            deadline = time.monotonic() + mail_timeout
            while len(mails := _mails(inbox, mode)) < forms:
                worker.check()
                if time.monotonic() > deadline:
                    raise dj.DJError(f"{mode}: {len(mails)} of {forms} mails arrived within {mail_timeout:.0f} s")
                time.sleep(0.05)
            time.sleep(0.5)  # a duplicate would arrive now
            mails = _mails(inbox, mode)
            addresses = [to for m in mails for to in m["to"]]
            rows.append({
                "mode": mode, "forms": forms, "clients": clients,
                "p50_ms": _percentile(latencies, 50) * 1000, "p95_ms": _percentile(latencies, 95) * 1000,
                "p99_ms": _percentile(latencies, 99) * 1000, "mean_ms": statistics.mean(latencies) * 1000,
                "requests_per_s": forms / wall,
                "last_mail_s": max(m["received_at"] for m in mails) - first,
                "mails": len(mails), "distinct_recipients": len(set(addresses)),
            })
            app.stop()
    finally:
        for child in reversed(children):
            child.stop()
    return rows
