"""`dj work --processes P`: P worker processes under one supervisor that restarts crashed ones."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from typing import Any

from . import db
from .worker import Worker

log = logging.getLogger("dj.supervisor")


def run_workers(processes: int = 1, burst: bool = False, **worker_options: Any) -> int:
    """Run workers until stopped (or drained, with burst). Returns 0 on a clean finish.

    With one process the worker runs right here; with more, each runs in a child process.
    """
    if processes < 1:
        raise ValueError("processes must be at least 1")
    worker_options.setdefault("database_url", db.database_url())
    if processes == 1:
        Worker(**worker_options).run(burst=burst)
        return 0
    return Supervisor(processes, burst, worker_options).run()


def _child(options: dict[str, Any], burst: bool, log_level: int) -> None:
    # Own process group: a Ctrl-C in the terminal reaches only the supervisor, which forwards one
    # SIGTERM, instead of every child seeing the signal twice and stopping at once.
    os.setpgrp()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    Worker(**options).run(burst=burst)


class Supervisor:
    def __init__(self, processes: int, burst: bool, worker_options: dict[str, Any]):
        self.processes = processes
        self.burst = burst
        self.options = dict(worker_options, parent_pid=os.getpid())
        self.ctx = multiprocessing.get_context("spawn")
        self.children: list[multiprocessing.Process] = []
        self.stopping = False
        self.signals = 0
        self.restarts = 0

    def run(self) -> int:
        self._install_signal_handlers()
        for _ in range(self.processes):
            self.children.append(self._start())
        while True:
            alive = 0
            for i, child in enumerate(self.children):
                if child.is_alive():
                    alive += 1
                    continue
                if child.exitcode == 0 or self.stopping:
                    continue
                log.warning("worker process %d exited with %s; starting a replacement", child.pid,
                            _describe_exit(child.exitcode))
                self.restarts += 1
                self.children[i] = self._start()
                alive += 1
            if alive == 0:
                return 0
            time.sleep(0.2)

    def _start(self) -> multiprocessing.Process:
        p = self.ctx.Process(target=_child, args=(self.options, self.burst, logging.getLogger("dj").getEffectiveLevel()),
                             name="dj-worker", daemon=False)
        p.start()
        return p

    def _install_signal_handlers(self) -> None:
        def handle(signum, frame):
            self.signals += 1
            self.stopping = True
            for child in self.children:
                if child.is_alive() and child.pid:
                    try:
                        os.kill(child.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"

