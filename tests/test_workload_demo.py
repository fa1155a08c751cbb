"""`dj demo --scale small` runs the whole workload end to end, as the README's main command."""

import pytest


def test_demo_small_runs_end_to_end(cli, conn):
    result = cli("demo", "--scale", "small", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for step in ("one big job per generator", "one per record", "one serial rebuild", "1000 ids per job"):
        assert step in out
    assert "all counters correct" in out
    assert "counters rebuilt while the app writes" in out
    for row in ("(a) set-based, 1 job", "(b) set-based, 1000-id jobs", "(c) per record*, 1 job"):
        assert row in out
    questions, answers, left = conn.execute(
        "SELECT (SELECT count(*) FROM questions), (SELECT count(*) FROM answers),"
        " (SELECT count(*) FROM jobs WHERE queue = 'demo')").fetchone()
    assert (questions, left) == (2_000, 0)
    assert answers > 20_000  # the seeded ones, and the live writer's
    from tasks import counters

    assert counters.check(conn) == []


def test_demo_refuses_an_unknown_scale(cli):
    result = cli("demo", "--scale", "enormous")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.no_database
def test_the_demo_knows_every_workload_table():
    from tasks import demo, schema

    assert set(demo.WORKLOAD_TABLES) == set(schema.TABLES)
