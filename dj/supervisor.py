"""`dj work --processes P`: P worker processes under one supervisor that restarts crashed ones."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

# Popen's process_group is Python 3.11's; setpgrp in the child does the same on 3.10.
_OWN_GROUP: dict[str, Any] = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}

import psycopg

from . import config, db, logs, pooler
from .errors import DJError, WorkerStuck
from .worker import Worker, _first_line

log = logging.getLogger("dj.supervisor")

_OPTIONS_ENV = "DJ_WORKER_OPTIONS"
EXIT_STUCK = 3  # a child whose runner threads were all stuck (WorkerStuck)


def run_workers(processes: int = 1, burst: bool = False, stop_with_parent: bool = False,
                **worker_options: Any) -> int:
    """Run workers until stopped (or drained, with burst). Returns 0 on a clean finish.

    With one process the worker runs right here; with more, each runs in a child process.
    `stop_with_parent` stops them when the calling process's parent dies (for a program that
    runs workers in a helper process of its own).
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    worker_options.setdefault("database_url", db.database_url())
    worker_options["listen_url"] = worker_options.get("listen_url") or config.listen_url()
    # Refuse what cannot work (a pooler in statement mode, a bad DJ_LISTEN_URL) once, here, with
    # one error, before any worker starts; each worker then finds the same (dj/pooler.py).
    pooler.listen_target(worker_options["database_url"], worker_options["listen_url"])
    if stop_with_parent:
        worker_options.setdefault("parent_pid", os.getppid())
    if processes == 1:
        Worker(**worker_options).run(burst=burst)
        return 0
    return Supervisor(processes, burst, worker_options, stop_with_parent).run()


def child_main() -> None:
    """Entry point of a supervised worker process; its options arrive as JSON in the environment."""
    spec = json.loads(os.environ.pop(_OPTIONS_ENV))
    logs.configure(spec["log_level"], spec["log_format"])
    # As in `dj work` itself: psycopg's "error ignored terminating <Pipeline>" when a connection
    # drops would be a second line for an outage that the worker already logs once.
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    try:
        Worker(**spec["options"]).run(burst=spec["burst"])
    except WorkerStuck:
        # Its stuck threads cannot be joined: leave at once, with the code that asks for a replacement.
        logging.shutdown()
        os._exit(EXIT_STUCK)
    except (DJError, psycopg.OperationalError) as exc:
        # Typically a replacement started while the database is down, or going down: it cannot
        # connect (DJError), or its connection is cut during start-up (OperationalError; once
        # started, the worker rides out outages itself). One line, not a traceback; the
        # supervisor starts another one after its back-off.
        log.warning("worker process could not start: %s", _first_line(exc))
        logging.shutdown()
        sys.exit(1)


class Supervisor:
    """Starts the children as fresh interpreters (no fork: the parent's threads and connections
    stay behind), forwards SIGTERM/SIGINT, and restarts children that die, with a growing delay
    when they die right after starting."""

    def __init__(self, processes: int, burst: bool, worker_options: dict[str, Any],
                 stop_with_parent: bool = False):
        self.processes = processes
        self.stop_with_parent = stop_with_parent
        self.burst = burst
        # Each child watches the supervisor, whatever parent the supervisor itself watches.
        self.spec = json.dumps({"options": dict(worker_options, parent_pid=os.getpid()), "burst": burst,
                                "log_level": logging.getLogger("dj").getEffectiveLevel(),
                                "log_format": logs.current_format()})
        self.children: list[subprocess.Popen] = []
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.restarts = 0
        self.quick_deaths = 0

    def run(self) -> int:
        previous = self._install_signal_handlers()
        try:
            for _ in range(self.processes):
                self.children.append(self._start())
            parent = os.getppid()
            while any([self._tend(i) for i in range(len(self.children))]):  # a list: tend every child
                if self.stop_with_parent and os.getppid() != parent and not self.stopping:
                    log.warning("parent process %d is gone; stopping the workers", parent)
                    self._stop_children()
                time.sleep(0.2)
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _tend(self, i: int) -> bool:
        """Look after child i; False once it has finished for good."""
        child = self.children[i]
        code = child.poll()
        if code is None:
            return True
        if code == 0 or self.stopping:
            return False
        lived = time.monotonic() - self.started_at.pop(child.pid, 0.0)
        self.quick_deaths = self.quick_deaths + 1 if lived < 5 else 0
        delay = min(30.0, 0.5 * 2 ** self.quick_deaths) if self.quick_deaths else 0.0
        log.warning("worker process %d exited with %s; starting a replacement%s", child.pid, _describe_exit(code),
                    f" in {delay:.1f}s" if delay else "")
        if delay:
            time.sleep(delay)
        if self.stopping:
            return False
        self.restarts += 1
        self.children[i] = self._start()
        return True

    def _start(self) -> subprocess.Popen:
        # Own process group: a Ctrl-C in the terminal reaches only the supervisor, which forwards
        # one SIGTERM, instead of every child seeing the signal twice and stopping at once.
        child = subprocess.Popen([sys.executable, "-c", "from dj.supervisor import child_main; child_main()"],
                                 env={**os.environ, _OPTIONS_ENV: self.spec}, **_OWN_GROUP)
        self.started_at[child.pid] = time.monotonic()
        return child

    def _stop_children(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                try:
                    child.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _install_signal_handlers(self) -> dict[int, Any]:
        def handle(signum, frame):
            self._stop_children()

        return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    if code == EXIT_STUCK:
        return f"code {code} (all its threads were stuck)"
    return f"code {code}"
