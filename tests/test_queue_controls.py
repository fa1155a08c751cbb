"""Queue pause and concurrency limits live in the database and bind every worker."""

from dj import admin
from tests.conftest import wait_for
from tests.support_jobs import record, sleep


def ran(conn):
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs ORDER BY at")]


def test_a_paused_queue_is_not_claimed_until_resumed(conn, worker_process):
    worker_process("--queues", "default,mail")
    admin.pause_queue(conn, "mail")
    record.using(queue="mail").enqueue("mail-1")
    record.enqueue("default-1")
    wait_for(lambda: "default-1" in ran(conn), message="the unpaused queue to run")
    assert "mail-1" not in ran(conn)
    assert conn.execute("SELECT count(*) FROM jobs WHERE queue = 'mail' AND locked_by IS NULL").fetchone()[0] == 1
    admin.resume_queue(conn, "mail")
    wait_for(lambda: "mail-1" in ran(conn), timeout=5, message="the resumed queue to run within seconds")


def test_pausing_stops_new_claims_within_a_second(conn, worker_process):
    worker_process("--concurrency", "1", "--prefetch", "0")
    sleep.enqueue_many([(0.2, f"s{i}") for i in range(40)])
    wait_for(lambda: len(ran(conn)) >= 2, message="jobs to start")
    admin.pause_queue(conn, "default")
    import time

    time.sleep(1.0)  # the promise under test is "within a second"
    settled = len(ran(conn))
    time.sleep(1.0)
    assert len(ran(conn)) <= settled + 1, "at most the job running at the pause may finish"
    assert conn.execute("SELECT count(*) FROM jobs WHERE locked_by IS NULL").fetchone()[0] > 30


def test_a_queue_limit_holds_across_four_worker_processes(conn, cli, worker_process):
    result = cli("queue", "limit", "default", "2")
    assert result.returncode == 0, result.stderr
    for _ in range(4):
        worker_process("--concurrency", "4")
    wait_for(lambda: conn.execute("SELECT count(*) FROM workers").fetchone()[0] == 4, message="4 workers")
    sleep.enqueue_many([(0.3, f"j{i}") for i in range(24)])
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0, timeout=60,
             message="all jobs to finish")
    events = conn.execute(
        "SELECT at, CASE WHEN marker LIKE '%:start' THEN 1 ELSE -1 END FROM test_runs ORDER BY at,"
        " CASE WHEN marker LIKE '%:end' THEN 0 ELSE 1 END").fetchall()
    running, peak = 0, 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert len(events) == 48
    assert peak == 2, f"peak concurrency {peak} with a limit of 2"
    pids = conn.execute("SELECT count(DISTINCT pid) FROM test_runs").fetchone()[0]
    assert pids >= 2


def test_removing_the_limit(conn, cli):
    assert cli("queue", "limit", "default", "1").returncode == 0
    assert admin.queue_settings(conn)["default"]["concurrency_limit"] == 1
    assert cli("queue", "limit", "default").returncode == 0
    assert admin.queue_settings(conn)["default"]["concurrency_limit"] is None


def test_a_pause_hands_back_the_jobs_a_worker_had_buffered(conn, worker_process):
    import time

    worker = worker_process("--concurrency", "1", "--prefetch", "20")
    sleep.enqueue_many([(0.3, f"b{i}") for i in range(30)])
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs WHERE locked_by IS NOT NULL").fetchone()[0] >= 10,
             message="the worker to buffer jobs")
    admin.pause_queue(conn, "default")
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs WHERE locked_by IS NOT NULL").fetchone()[0] <= 1,
             timeout=2, message="the buffered jobs to be handed back within a second or two")
    worker.wait_for_log("paused: handing back")
    time.sleep(1.0)  # nothing more may start while paused
    started = conn.execute("SELECT count(*) FROM test_runs WHERE marker LIKE '%:start'").fetchone()[0]
    assert started <= 3
    unstarted = conn.execute("SELECT count(*) FROM jobs WHERE locked_by IS NULL AND attempts = 0").fetchone()[0]
    assert unstarted >= 30 - started
