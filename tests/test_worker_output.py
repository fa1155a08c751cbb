"""What `dj work` prints: JSON events per job, per-job lines at --verbose, and periodic summaries."""

import json
import logging

import dj
from tests.support_jobs import fail, permanent, record


def test_log_format_json_gives_one_object_per_job_event(conn, cli):
    record.enqueue("ok")
    fail.using(max_attempts=5).enqueue("retry")
    permanent.enqueue("dead")
    result = cli("work", "--burst", "--concurrency", "1", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    by_event = {}
    for e in events:
        by_event.setdefault(e.get("event"), []).append(e)
    assert len(by_event["job_started"]) == 3
    assert [e["task"] for e in by_event["job_succeeded"]] == ["test.record"]
    assert [e["task"] for e in by_event["job_failed"]] == ["test.fail"]
    assert [e["task"] for e in by_event["job_dead"]] == ["test.permanent"]
    for e in by_event["job_succeeded"] + by_event["job_failed"] + by_event["job_dead"]:
        assert e["duration_s"] >= 0 and e["attempt"] == 1 and isinstance(e["job_id"], int)
    assert "boom retry" in by_event["job_failed"][0]["error"]


def test_default_output_has_no_per_job_lines_but_verbose_does(conn, cli):
    record.enqueue_many([(i,) for i in range(5)])
    quiet = cli("work", "--burst")
    assert quiet.returncode == 0 and "job succeeded" not in quiet.stderr
    record.enqueue_many([(i,) for i in range(5)])
    loud = cli("work", "--burst", "--verbose")
    assert loud.returncode == 0
    assert loud.stderr.count("job succeeded") == 5


def test_a_summary_line_reports_what_happened_since_the_last(conn, caplog):
    record.enqueue_many([(i,) for i in range(30)])
    fail.using(max_attempts=1).enqueue("x")
    with caplog.at_level(logging.INFO, logger="dj.worker"):
        dj.Worker(concurrency=2, summary_interval=0.0).run(burst=True)
    summaries = [r for r in caplog.records if getattr(r, "event", None) == "summary"]
    assert summaries, "no summary line"
    assert sum(r.succeeded for r in summaries) == 30
    assert sum(r.dead for r in summaries) == 1
