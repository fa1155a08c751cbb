"""kill -9 of any supervised worker process, not only the first one the supervisor started."""

import os
import signal

from tests.conftest import wait_for
from tests.support_jobs import record


def test_the_supervisor_replaces_every_child_that_dies(conn, worker_process):
    supervisor = worker_process("--processes", "3", "--concurrency", "1")
    pids = wait_for(lambda: {r[0] for r in conn.execute("SELECT pid FROM workers")} if
                    conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 3 else None,
                    message="three worker processes to register")
    victims = sorted(pids)[1:]  # the supervisor once looked after its first child only
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len({r[0] for r in conn.execute("SELECT pid FROM workers WHERE NOT pid = ANY(%s)",
                                                     (victims,))}) == 3,
             timeout=30, message="two replacement workers to register")
    for victim in victims:
        supervisor.wait_for_log(f"worker process {victim} exited with signal SIGKILL; starting a replacement")
    record.enqueue_many([(f"after{i}",) for i in range(10)])
    wait_for(lambda: conn.execute("SELECT count(*) FROM test_runs").fetchone()[0] == 10,
             message="the pool to run new jobs")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0
