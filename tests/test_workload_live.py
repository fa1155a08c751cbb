"""Counter rebuilds under live writes (tasks/live.py): dj's rebuilds, one job or batched, run by
real worker processes while a writer bumps counters, lose no increment. Speed is the demo's
business, not these tests'."""

from __future__ import annotations

import pytest

from tasks import counters, live
from tests.conftest import wait_for

QUEUE = "live"


@pytest.fixture
def board(conn):
    """A small storefront and Q&A board with correct counters."""
    conn.execute("INSERT INTO users (name, email) SELECT 'u', 'u@example.com' FROM generate_series(1, 20)")
    conn.execute("INSERT INTO items (name, description, image_url) SELECT 'i', 'd', 'x' FROM generate_series(1, 30)")
    conn.execute("INSERT INTO questions (title, body) SELECT 'q', 'b' FROM generate_series(1, 3000)")
    conn.execute("INSERT INTO answers (question_id, body, approved) "
                 "SELECT 1 + i % 3000, 'a', i % 3 = 0 FROM generate_series(1, 20000) AS i")
    for table in counters.TABLES:
        counters.rebuild_table(conn, table)
    assert counters.check(conn) == []
    return conn


@pytest.fixture
def drain(board, worker_process):
    workers = worker_process("--queues", QUEUE, "--processes", "2", "--concurrency", "4")

    def wait(label: str) -> None:
        def done():
            assert workers.poll() is None, workers.log()
            pending, dead = board.execute("SELECT count(*) FILTER (WHERE failed_at IS NULL), "
                                          "count(*) FILTER (WHERE failed_at IS NOT NULL) FROM jobs WHERE queue = %s",
                                          (QUEUE,)).fetchone()
            assert not dead, f"{label}: a rebuild job died"
            return pending == 0

        wait_for(done, timeout=120, message=f"{label} to finish")

    return wait


@pytest.mark.parametrize("mode", [m for m in live.MODES if m.key in ("serial", "batched")], ids=lambda m: m.key)
def test_a_rebuild_under_live_writes_loses_no_increment(board, drain, mode):
    answers_before = board.execute("SELECT count(*) FROM answers").fetchone()[0]
    result = live.run_mode(mode, QUEUE, drain, batch=500, rate=300, settle_s=0.3)

    assert result["writer"]["writes"] > 100  # the writer really wrote throughout the rebuild
    assert board.execute("SELECT count(*) FROM answers").fetchone()[0] > answers_before
    assert result["wrong_counters"] == 0 and result["lost_increments"] == 0
    assert counters.check(board) == []  # damage repaired, every live increment kept
    total, counted = board.execute("SELECT (SELECT count(*) FROM answers), sum(answers_count) FROM questions").fetchone()
    assert total == counted


def test_the_rake_tasks_way_visits_each_record_and_fixes_it_when_nothing_writes(board):
    with board.transaction():
        board.execute("UPDATE questions SET answers_count = answers_count + 7 WHERE id <= 10")
    assert counters.rebuild_records(board, "questions", limit=5) == 5
    assert [m["id"] for m in counters.check(board)] == list(range(6, 11))
    counters.rebuild_records(board, "questions")
    assert counters.check(board) == []
