"""The workload as a user drives it from the shell: `dj enqueue seed`, `dj enqueue rebuild-counters`
and `dj counters check`, including their bad input (one `error:` line, exit 2, nothing enqueued)."""

from __future__ import annotations

import pytest

from tasks import counters, seed
from tests.test_cli import WIDE, error_line, ok, run_parallel


def jobs(conn) -> int:
    return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_seed_from_the_shell_makes_the_requested_records(cli, conn, run_burst):
    text = ok(cli("enqueue", "seed", "--users", "5", "--items", "4", "--orders", "0", "--per-job", "2", env=WIDE))
    assert jobs(conn) == 3 + 2  # ceil(5 / 2) user jobs, 4 / 2 item jobs
    assert "users" in text and "items" in text and "seeding jobs enqueued" in text
    run_burst()
    ok(cli("enqueue", "seed", "--users", "0", "--items", "0", "--orders", "6", "--questions", "3", "--per-job", "100"))
    run_burst()
    counts = conn.execute("SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items),"
                          " (SELECT count(*) FROM orders), (SELECT count(*) FROM questions)").fetchone()
    assert counts == (5, 4, 6, 3)


@pytest.mark.parametrize("args", [
    ("--batch", "0"),
    ("--batch", "-5"),
    ("--batch", "ten"),
    ("--table", "nope"),
])
def test_rebuild_counters_refuses_bad_input_and_enqueues_nothing(cli, conn, args):
    seed.insert_users(conn, 3)
    line = error_line(cli("enqueue", "rebuild-counters", *args))
    if "--table" in args:
        assert "nope" in line and "questions" in line  # names the valid tables
    else:
        assert "batch" in line.lower()
    assert jobs(conn) == 0


def test_rebuild_counters_on_an_empty_database_has_nothing_to_rebuild(cli, conn):
    result = cli("enqueue", "rebuild-counters", "--batch", "1000")
    assert ok(result).strip() == "nothing to rebuild"
    assert jobs(conn) == 0


def test_rebuild_counters_prints_its_jobs_and_ranges_and_the_check_agrees(cli, conn, run_burst):
    seed.insert_questions(conn, 25)
    seed.insert_answers(conn, 60)
    counters.rebuild_table(conn, "questions")  # COPY leaves the counters at 0
    conn.execute("UPDATE questions SET answers_count = answers_count + 3 WHERE id % 4 = 0")

    wrong = cli("counters", "check", env=WIDE)
    assert wrong.returncode == 1, wrong.stderr
    assert "6 wrong counter(s)" in wrong.stdout and "answers_count" in wrong.stdout

    text = ok(cli("enqueue", "rebuild-counters", "--batch", "10", "--table", "questions", env=WIDE))
    assert "enqueued 3 rebuild jobs" in text
    assert "1-10, 11-20, 21-25" in text
    run_burst()
    run_burst()  # the batch's callback, enqueued by the last rebuild job
    results = run_parallel(cli, {"check": ("counters", "check"), "all": ("enqueue", "rebuild-counters")})
    assert ok(results["check"]).strip() == "all counters correct"
    assert "enqueued 1 rebuild jobs" in ok(results["all"])  # 25 questions, default batch 1000
