"""The dashboard over HTTP (Starlette's TestClient): pages, CSRF, token auth, host checks, /metrics,
escaping, and every action. The browser-level tests are in test_web_browser.py."""

from __future__ import annotations

import json
import re
import socket
import sys

import warnings

import pytest
from starlette.routing import Route

with warnings.catch_warnings():  # Starlette 1.x would rather have httpx2; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from dj import admin
from dj.errors import DJError
from dj.web import check_host, create_app

LOCAL = "http://127.0.0.1"
HTML = {"Accept": "text/html"}
XSS = "<script>alert('xss')</script>"
XSS_IMG = '<img src=x onerror="alert(1)">'


@pytest.fixture
def client(db_url):
    with TestClient(create_app(db_url), base_url=LOCAL) as c:
        yield c


def csrf_of(client: TestClient, path: str = "/") -> str:
    page = client.get(path, headers=HTML)
    assert page.status_code == 200, page.text
    return re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text).group(1)


def flash_of(html: str) -> str:
    m = re.search(r'<p class="flash (?:ok|error)" role="status">([^<]*)</p>', html)
    return m.group(1) if m else ""


def add_job(conn, queue="default", task="test.record", *, state="ready", args="[1]", error=None) -> int:
    run_at = "now() + interval '1 hour'" if state == "scheduled" else "now() - interval '1 second'"
    return conn.execute(
        f"INSERT INTO jobs (queue, task, args, run_at, attempts, last_error, failed_at, locked_by, locked_at) "
        f"VALUES (%s, %s, %s::jsonb, {run_at}, %s, %s, %s, %s, %s) RETURNING id",
        (queue, task, args, 3 if state == "dead" else 0, error,
         "2026-01-01T00:00:00Z" if state == "dead" else None,
         "box:1" if state == "running" else None, "2026-01-01T00:00:00Z" if state == "running" else None),
    ).fetchone()[0]


def state_of(conn, job_id: int) -> str | None:
    try:
        return admin.get_job(conn, job_id)["state"]
    except DJError:
        return None


# --- pages ----------------------------------------------------------------------------------------

def test_overview_shows_counts_per_queue_and_paused_or_active(client, conn):
    for _ in range(3):
        add_job(conn, "default")
    add_job(conn, "default", state="scheduled")
    add_job(conn, "mail", state="dead", error="boom")
    admin.pause_queue(conn, "reports")  # paused, and no jobs yet: still listed

    page = client.get("/", headers=HTML)
    assert page.status_code == 200
    rows = {m.group(1): m.group(2) for m in re.finditer(r'<tr data-queue="([^"]+)">(.*?)</tr>', page.text, re.S)}
    assert set(rows) == {"default", "mail", "reports"}

    def count(queue, key):
        return int(re.search(rf'data-count="{key}"[^>]*>(?:<a [^>]*>)?([\d,]+)', rows[queue]).group(1))

    assert (count("default", "ready"), count("default", "scheduled"), count("default", "dead")) == (3, 1, 0)
    assert count("mail", "dead") == 1
    assert "active" in rows["default"] and "paused" not in rows["default"]
    assert "paused" in rows["reports"] and 'data-action="resume"' in rows["reports"]
    assert 'data-action="retry-dead"' in rows["mail"]
    # The live part is a fragment that htmx polls; it shows the same table.
    fragment = client.get("/fragments/queues")
    assert fragment.status_code == 200 and 'data-queue="reports"' in fragment.text
    assert "<html" not in fragment.text
    assert client.get("/static/htmx.min.js").status_code == 200


def test_status_json_keys_are_unchanged_by_pausing(conn):
    add_job(conn, "default")
    admin.pause_queue(conn, "default")
    doc = admin.status(conn)  # the `dj status --json` document: the dashboard adds "paused" on its side only
    assert {"queues", "totals", "workers", "throughput"} <= set(doc)
    assert set(doc["queues"]["default"]) == {"ready", "scheduled", "running", "dead", "retrying", "waiting",
                                             "oldest_ready_age_s"}  # waiting: added by dependencies


def test_throughput_chart_is_inline_svg_per_minute(client, conn):
    conn.execute("INSERT INTO job_stats (bucket, queue, succeeded, failed) VALUES "
                 "(date_bin('10 seconds', now() - interval '5 minutes', timestamptz '2000-01-01'), 'default', 40, 2), "
                 "(date_bin('10 seconds', now(), timestamptz '2000-01-01'), 'mail', 7, 1), "
                 "(now() - interval '2 hours', 'default', 1000, 1000)")  # older than the hour: not shown
    svg = client.get("/fragments/chart").text
    assert svg.lstrip().startswith("<svg")
    assert "47 succeeded, 3 failed" in svg  # the chart's title: the hour's totals
    assert svg.count('class="ok"') == 2 and svg.count('class="fail"') == 2
    assert "2 succeeded, 1 failed" not in svg and "40 succeeded, 2 failed" in svg  # one bar's tooltip


def test_workers_page_marks_stale_workers(client, conn):
    conn.execute("INSERT INTO workers (name, host, pid, queues, concurrency, heartbeat_at) VALUES "
                 "('fresh:1', 'fresh', 1, '{default,mail}', 8, now() - interval '2 seconds'), "
                 "('old:2', 'old', 2, '{reports}', 4, now() - interval '45 seconds')")
    add_job(conn, state="running")  # held by box:1, not a worker here
    html = client.get("/workers", headers=HTML).text
    rows = {m.group(1): m.group(2) for m in re.finditer(r'<tr data-worker="([^"]+)"[^>]*>(.*?)</tr>', html, re.S)}
    assert set(rows) == {"fresh:1", "old:2"}
    assert "stale" not in rows["fresh:1"] and "default, mail" in rows["fresh:1"] and ">fresh<" in rows["fresh:1"]
    assert "stale" in rows["old:2"] and ">2<" in rows["old:2"]
    assert 'class="stale"' in html


def test_jobs_list_filters_pages_and_finds_by_id(client, conn):
    ids = [add_job(conn, "default", "test.record") for _ in range(120)]
    other = add_job(conn, "mail", "test.fail", state="dead", error="ValueError: nope")

    def listed(url):
        return [int(i) for i in re.findall(r'<tr data-job="(\d+)">', client.get(url, headers=HTML).text)]

    first = client.get("/jobs", headers=HTML).text
    assert listed("/jobs") == ids[:50] and 'rel="next"' in first and 'rel="prev"' not in first
    second = listed(f"/jobs?after={ids[49]}")
    assert second == ids[50:100]
    assert listed(f"/jobs?before={ids[50]}") == ids[:50]
    assert listed(f"/jobs?after={ids[99]}") == ids[100:] + [other]
    assert listed("/jobs?state=dead") == [other]
    assert listed("/jobs?queue=mail") == [other]
    assert listed("/jobs?task=test.fail") == [other]
    assert listed("/jobs?queue=default&state=dead") == []
    assert "nope" in client.get("/jobs?state=dead", headers=HTML).text  # the error's last line

    found = client.get(f"/jobs?id={ids[7]}", follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == f"/jobs/{ids[7]}"
    assert "no job 99999" in client.get("/jobs?id=99999", headers=HTML).text
    assert "is not a job id" in client.get("/jobs?id=abc", headers=HTML).text


def test_job_page_shows_everything(client, conn):
    job_id = add_job(conn, "mail", "test.fail", state="dead", args='["a", 2]',
                     error='Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom')
    page = client.get(f"/jobs/{job_id}", headers=HTML)
    assert page.status_code == 200
    html = page.text
    assert '["a", 2]' in html.replace("&#34;", '"')
    assert "Traceback (most recent call last):" in html and "ValueError: boom" in html
    assert "3 of 25" in html and 'data-action="retry"' in html and 'data-action="cancel"' in html
    missing = client.get("/jobs/99999", headers=HTML)
    assert missing.status_code == 404 and "finished jobs are deleted" in missing.text


# --- actions --------------------------------------------------------------------------------------

def test_retry_a_dead_job(client, conn):
    job_id = add_job(conn, state="dead", error="boom")
    conn.execute("LISTEN dj_jobs")
    r = client.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(client)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job_id}"
    job = admin.get_job(conn, job_id)
    assert job["state"] == "ready" and job["attempts"] == 0
    assert [n.payload for n in conn.notifies(timeout=1, stop_after=1)] == ["default"]
    assert "ready to run again" in flash_of(client.get(r.headers["location"], headers=HTML).text)


def test_retry_all_dead_jobs_of_one_queue(client, conn):
    mail = [add_job(conn, "mail", state="dead", error="x") for _ in range(2)]
    other = add_job(conn, "default", state="dead", error="x")
    r = client.post("/queues/retry-dead", data={"csrf": csrf_of(client), "queue": "mail"})
    assert r.status_code == 200 and "2 dead job(s) of mail" in flash_of(r.text)
    assert [state_of(conn, i) for i in mail] == ["ready", "ready"]
    assert state_of(conn, other) == "dead"


def test_cancel_deletes_a_job_but_not_a_running_one(client, conn):
    waiting, running = add_job(conn), add_job(conn, state="running")
    token = csrf_of(client)
    r = client.post(f"/jobs/{waiting}/cancel", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/jobs"
    assert state_of(conn, waiting) is None
    r = client.post(f"/jobs/{running}/cancel", data={"csrf": token})
    assert "is running; it cannot be cancelled" in flash_of(r.text)
    assert state_of(conn, running) == "running"


def test_run_a_scheduled_job_now(client, conn):
    job_id = add_job(conn, state="scheduled")
    assert 'data-action="run-now"' in client.get(f"/jobs/{job_id}", headers=HTML).text
    r = client.post(f"/jobs/{job_id}/run-now", data={"csrf": csrf_of(client)})
    assert r.status_code == 200 and "runs now" in flash_of(r.text)
    assert state_of(conn, job_id) == "ready"


def test_pause_and_resume_a_queue(client, conn):
    add_job(conn, "mail")
    conn.execute("LISTEN dj_queue_settings")
    conn.execute("LISTEN dj_jobs")
    token = csrf_of(client)
    r = client.post("/queues/pause", data={"csrf": token, "queue": "mail"})
    assert r.status_code == 200 and "queue mail is paused" in flash_of(r.text)
    assert admin.queue_settings(conn) == {"mail": {"paused": True, "concurrency_limit": None}}
    assert re.search(r'<tr data-queue="mail">.*?badge paused', r.text, re.S)
    notes = list(conn.notifies(timeout=1, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [("dj_queue_settings", '{"queue": "mail", "paused": true}')]

    r = client.post("/queues/resume", data={"csrf": token, "queue": "mail"})
    assert "queue mail is active again" in flash_of(r.text)
    assert admin.queue_settings(conn)["mail"]["paused"] is False
    notes = list(conn.notifies(timeout=1, stop_after=2))
    assert sorted((n.channel, n.payload) for n in notes) == [
        ("dj_jobs", "mail"), ("dj_queue_settings", '{"queue": "mail", "paused": false}')]


def test_pause_functions(conn):
    admin.pause_queue(conn, "a")
    admin.pause_queue(conn, "a")
    admin.pause_queue(conn, "b")
    admin.resume_queue(conn, "b")
    assert admin.queue_settings(conn) == {"a": {"paused": True, "concurrency_limit": None},
                                          "b": {"paused": False, "concurrency_limit": None}}
    with pytest.raises(DJError):
        admin.pause_queue(conn, "")


# --- CSRF -----------------------------------------------------------------------------------------

def post_routes(app) -> list[str]:
    return [r.path for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ())]


def test_every_post_route_refuses_a_missing_or_wrong_csrf_token(client, conn):
    job_id = add_job(conn, "mail", state="dead", error="x")
    paths = [p.replace("{job_id:int}", str(job_id)) for p in post_routes(client.app)]
    assert {"/login", "/logout", "/queues/pause", "/queues/resume", "/queues/retry-dead",
            f"/jobs/{job_id}/retry", f"/jobs/{job_id}/cancel", f"/jobs/{job_id}/run-now"} <= set(paths)
    good = csrf_of(client)
    with TestClient(create_app(), base_url=LOCAL) as stranger:  # another browser, another cookie
        theirs = csrf_of(stranger)
        for path in paths:
            form = {"queue": "mail", "token": "x"}
            for attempt in ({}, {"csrf": ""}, {"csrf": "0" * 64}, {"csrf": theirs}):
                r = client.post(path, data={**form, **attempt}, follow_redirects=False)
                assert r.status_code == 403, (path, attempt, r.status_code)
                assert "CSRF" in r.text
            # A page's token with no cookie (a cross-site form post) is refused as well.
            r = TestClient(client.app, base_url=LOCAL).post(path, data={**form, "csrf": good})
            assert r.status_code == 403, path
    assert state_of(conn, job_id) == "dead" and admin.queue_settings(conn) == {}
    # The same request with the right token goes through.
    assert client.post("/queues/pause", data={"csrf": good, "queue": "mail"}).status_code == 200
    assert admin.queue_settings(conn)["mail"]["paused"] is True


def test_cross_origin_posts_are_refused(client, conn):
    token = csrf_of(client)
    r = client.post("/queues/pause", data={"csrf": token, "queue": "mail"},
                    headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.text
    assert admin.queue_settings(conn) == {}
    r = client.post("/queues/pause", data={"csrf": token, "queue": "mail"}, headers={"Origin": LOCAL})
    assert r.status_code == 200


def test_responses_carry_security_headers(client):
    r = client.get("/", headers=HTML)
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert "dj_csrf=" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]


# --- token and hosts ------------------------------------------------------------------------------

def test_without_a_token_only_loopback_host_names_are_served(client):
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"Host": "rebind.attacker.test:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "127.1.2.3:80", "[::1]:8000"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host


def test_a_token_is_required_by_bearer_or_login(db_url, conn):
    add_job(conn)
    with TestClient(create_app(db_url, token="s3cret"), base_url="http://dash.example.com") as c:
        r = c.get("/jobs?state=ready", headers=HTML, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fjobs%3Fstate%3Dready"
        for path in ("/metrics", "/fragments/queues", "/jobs/1"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/", headers={"Authorization": "Bearer s3cret", **HTML}).status_code == 200
        assert c.get("/static/dj.css").status_code == 200
        forged = TestClient(c.app, base_url="http://dash.example.com", cookies={"dj_session": "99999999999.forged"})
        assert forged.get("/metrics").status_code == 401

        token = csrf_of(c, "/login")
        r = c.post("/login", data={"csrf": token, "token": "nope", "next": "/jobs"})
        assert r.status_code == 401 and "wrong token" in r.text
        assert c.post("/login", data={"token": "s3cret", "next": "/jobs"}).status_code == 403  # no CSRF token
        r = c.post("/login", data={"csrf": token, "token": "s3cret", "next": "//evil.example/"},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"  # never off-site
        assert "HttpOnly" in r.headers["set-cookie"]
        assert c.get("/", headers=HTML).status_code == 200
        assert c.get("/metrics").status_code == 200

        assert c.post("/logout", data={"csrf": token}, follow_redirects=False).status_code == 303
        assert c.get("/", headers=HTML, follow_redirects=False).status_code == 303


@pytest.mark.no_database
def test_check_host_refuses_non_loopback_without_a_token():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        check_host(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""):
        with pytest.raises(DJError, match="without a token"):
            check_host(host, None)
        check_host(host, "s3cret")


def test_dj_web_refuses_a_public_host_without_a_token(cli):
    result = cli("web", "--host", "0.0.0.0", "--port", "0", env={"DJ_WEB_TOKEN": ""})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to listen on 0.0.0.0 without a token")
    assert "--token" in lines[0] and "DJ_WEB_TOKEN" in lines[0]


def run_dj(monkeypatch, capsys, *args: str, env: dict | None = None) -> tuple[int, str]:
    """`dj ARGS` in this process (the subprocess test above covers the real command): exit code, stderr."""
    from dj import cli, db

    monkeypatch.setattr(db, "_override", db._override)  # restored afterwards: dj web sets it
    monkeypatch.setattr(sys, "argv", ["dj", *args])
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def test_dj_web_takes_the_token_from_the_environment(monkeypatch, capsys, db_url):
    # With DJ_WEB_TOKEN the host check passes and dj web goes on to the database (unreachable here).
    code, err = run_dj(monkeypatch, capsys, "web", "--host", "0.0.0.0", "--database-url",
                       "postgresql://nobody@127.0.0.1:1/none", env={"DJ_WEB_TOKEN": "s3cret"})
    assert code == 2 and err.startswith("error: cannot connect to postgresql://nobody@127.0.0.1:1/none"), err


def test_dj_web_names_a_port_in_use(monkeypatch, capsys, db_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run_dj(monkeypatch, capsys, "web", "--port", str(port), "--database-url", db_url)
    assert code == 2
    assert err.strip() == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


# --- escaping -------------------------------------------------------------------------------------

def test_args_errors_and_names_are_escaped_everywhere(client, conn):
    queue, task = f"q{XSS}", f"t{XSS_IMG}"
    job_id = add_job(conn, queue, task, state="dead", args=json.dumps([XSS, {"k": XSS_IMG}]),
                     error=f"Traceback:\n{XSS}\n{XSS_IMG}")
    conn.execute("UPDATE jobs SET kwargs = jsonb_build_object('html', %s::text) WHERE id = %s", (XSS, job_id))
    conn.execute("INSERT INTO workers (name, host, pid, queues, concurrency) VALUES (%s, %s, 1, %s, 1)",
                 (f"w{XSS}", f"h{XSS_IMG}", [queue]))
    pages = ["/", "/fragments/queues", "/jobs", "/jobs?state=dead", f"/jobs?queue={queue}", f"/jobs/{job_id}",
             "/workers", "/fragments/workers"]
    for path in pages:
        html = client.get(path, headers=HTML).text
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "&lt;script&gt;" in html or "&lt;img" in html, path
    job_page = client.get(f"/jobs/{job_id}", headers=HTML).text
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in job_page
    assert "&lt;img src=x onerror=" in job_page


# --- /metrics -------------------------------------------------------------------------------------

def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    m = re.search(pattern, text, re.M)
    assert m, f"{name}{{{want}}} not in:\n{text}"
    return float(m.group(1))


def test_metrics(client, conn):
    for _ in range(3):
        add_job(conn, "default")
    add_job(conn, "default", state="scheduled")
    add_job(conn, "mail", state="dead", error="x")
    add_job(conn, "mail", state="running")
    conn.execute("UPDATE jobs SET attempts = 1 WHERE id = %s", (add_job(conn, "mail"),))  # waiting to retry
    conn.execute("UPDATE jobs SET run_at = now() - interval '90 seconds' WHERE id = 1")
    admin.pause_queue(conn, "mail")
    conn.execute("INSERT INTO job_stats (bucket, queue, succeeded, failed) VALUES "
                 "(date_bin('10 seconds', now(), timestamptz '2000-01-01'), 'default', 10, 2), "
                 "(now() - interval '3 hours', 'default', 100, 0)")
    conn.execute("INSERT INTO workers (name, host, pid, queues, concurrency) VALUES ('box:1', 'box', 1, '{mail}', 2)")

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE dj_jobs gauge" in text and "# TYPE dj_jobs_succeeded_total counter" in text
    assert metric(text, "dj_jobs", queue="default", state="ready") == 3
    assert metric(text, "dj_jobs", queue="default", state="scheduled") == 1
    assert metric(text, "dj_jobs", queue="mail", state="dead") == 1
    assert metric(text, "dj_jobs", queue="mail", state="running") == 1
    assert 'state="retrying"' not in text and metric(text, "dj_jobs_retrying", queue="mail") == 1
    assert 89 < metric(text, "dj_queue_oldest_ready_age_seconds", queue="default") < 200
    assert metric(text, "dj_queue_paused", queue="mail") == 1
    assert metric(text, "dj_queue_paused", queue="default") == 0
    assert metric(text, "dj_jobs_succeeded_total", queue="default") == 110
    assert metric(text, "dj_jobs_failed_total", queue="default") == 2
    assert metric(text, "dj_workers") == 1 and metric(text, "dj_worker_running_jobs", worker="box:1") == 1
    assert metric(text, "dj_database_up") == 1

    # The totals only grow: a bucket that grows adds the difference; pruned buckets take nothing away.
    conn.execute("UPDATE job_stats SET succeeded = succeeded + 5, failed = failed + 1 WHERE bucket > now() - interval '1 hour'")
    text = client.get("/metrics").text
    assert metric(text, "dj_jobs_succeeded_total", queue="default") == 115
    assert metric(text, "dj_jobs_failed_total", queue="default") == 3
    conn.execute("DELETE FROM job_stats WHERE bucket < now() - interval '1 hour'")
    conn.execute("INSERT INTO job_stats (bucket, queue, succeeded) VALUES "
                 "(date_bin('10 seconds', now() + interval '10 seconds', timestamptz '2000-01-01'), 'mail', 4)")
    text = client.get("/metrics").text
    assert metric(text, "dj_jobs_succeeded_total", queue="default") == 115
    assert metric(text, "dj_jobs_succeeded_total", queue="mail") == 4


def test_the_schema_has_queue_settings(conn):
    assert conn.execute("SELECT to_regclass('queue_settings') IS NOT NULL").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM alembic_version WHERE version_num >= '0003'").fetchone()[0] == 1


def test_metrics_run_time_histogram_from_real_workers(client, conn, run_burst):
    from tests.support_jobs import record, sleep

    record.enqueue_many([(i,) for i in range(5)])
    sleep.enqueue_many([(0.3, "slow1"), (0.3, "slow2")])
    run_burst()
    text = client.get("/metrics").text
    assert "# TYPE dj_job_run_seconds histogram" in text
    assert metric(text, "dj_job_run_seconds_count", queue="default") == 7
    assert metric(text, "dj_job_run_seconds_bucket", le="0.1", queue="default") == 5
    assert metric(text, "dj_job_run_seconds_bucket", le="1.0", queue="default") == 7
    assert metric(text, "dj_job_run_seconds_bucket", le="+Inf", queue="default") == 7
    assert 0.6 <= metric(text, "dj_job_run_seconds_sum", queue="default") < 5
