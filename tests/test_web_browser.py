"""The dashboard in a real browser: headless Debian Chromium driven by Playwright, against `dj web`
running as a subprocess on the test database, with real `dj work` processes.

Deselect with `-m 'not browser'`. The tests skip, saying why, only when /usr/bin/chromium is not
installed (.ci/run installs Debian's chromium with apt when it runs as root).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone

import pytest

from dj import task as task_mod
from tests.conftest import ROOT, start_worker, wait_for

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "dashboard.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason=f"no Chromium at {CHROMIUM}: install Debian's package with 'apt-get install chromium' "
                              "(.ci/run does this when it runs as root)"),
]

from playwright.sync_api import expect, sync_playwright  # noqa: E402  (a dev dependency: fail loudly if missing)

XSS_SCRIPT = "<script>window.__xss = 'script'</script>"
XSS_IMG = "<img src=x onerror=\"window.__xss = 'img'\">"


class WebServer:
    """`dj web --port 0` as a subprocess; `url` is known once it printed where it listens."""

    def __init__(self, db_url: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dj", "web", "--port", "0", "--database-url", db_url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy())
        self._line: list[str] = []
        self._reader = threading.Thread(target=lambda: self._line.append(self.proc.stdout.readline()), daemon=True)
        self._reader.start()
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            self._reader.join(30)
            m = re.search(r"serving (http://\S+?)/ ", self._line[0] if self._line else "")
            if not m:
                self.stop()
                pytest.fail(f"dj web did not start: {self._line!r} {self.proc.stderr.read()}")
            self._url = m.group(1)
        return self._url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# The server, one worker and the browser start together once for the module; they boot in parallel.
@pytest.fixture(scope="module")
def server(db_url):
    web = WebServer(db_url)
    yield web
    web.stop()


@pytest.fixture(scope="module")
def worker(db_url):
    proc = start_worker("--queues", "revive,pausable", "--concurrency", "2")
    yield proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser(server):
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(server, worker, browser):
    context = browser.new_context(viewport={"width": 1200, "height": 820}, base_url=server.url)
    pg = context.new_page()
    pg.dialogs = []

    def on_dialog(dialog):
        pg.dialogs.append(dialog.message)
        dialog.accept()  # the confirm() before destructive actions

    pg.on("dialog", on_dialog)
    yield pg
    context.close()


def enqueue(queue: str, marker: str, n: int = 1, task: str = "test.record") -> list[int]:
    return [task_mod.enqueue(task, [f"{marker}-{i}"], queue=queue) for i in range(n)]


def runs(conn, prefix: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT marker FROM test_runs WHERE marker LIKE %s ORDER BY marker",
                                       (prefix + "%",))]


def queue_row(page, queue: str):
    return page.locator(f'tr[data-queue="{queue}"]')


def test_counts_change_after_an_enqueue(page, conn):
    enqueue("live", "seen", 1)
    page.goto("/")
    ready = queue_row(page, "live").locator('td[data-count="ready"]')
    expect(ready).to_have_text("1")
    enqueue("live", "later", 3)
    expect(ready).to_have_text("4", timeout=10_000)  # htmx refreshes the table every 2 s, no reload
    expect(page.locator('a[data-total="ready"] .n')).to_have_text("4")


def test_retry_a_dead_job_and_it_runs(page, conn, worker):
    # Dead from the start (the worker is already running, so an enqueued job would just run).
    job_id = conn.execute(
        "INSERT INTO jobs (queue, task, args, attempts, failed_at, last_error) "
        "VALUES ('revive', 'test.record', '[\"revived-0\"]', 25, now(), 'ValueError: gave up') RETURNING id").fetchone()[0]
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("h1 .badge")).to_have_text("dead")
    expect(page.locator('pre[data-field="last_error"]')).to_have_text("ValueError: gave up")
    worker.wait_for_log("started")
    assert runs(conn, "revived") == []
    page.click('button[data-action="retry"]')
    expect(page.locator(".flash")).to_contain_text(f"job {job_id} is ready to run again")
    wait_for(lambda: runs(conn, "revived") == ["revived-0"], timeout=15,
             message=f"the retried job to run; worker log:\n{worker.log()}")
    page.reload()
    expect(page.locator("main")).to_contain_text("finished jobs are deleted")


def test_pausing_a_queue_stops_workers_taking_its_jobs(page, conn, worker):
    # A job for tomorrow keeps the queue's row on the overview while the others come and go.
    task_mod.enqueue("test.record", ["tomorrow"], queue="pausable", run_at=datetime.now(timezone.utc) + timedelta(days=1))
    enqueue("pausable", "warmup", 1)
    wait_for(lambda: runs(conn, "warmup") == ["warmup-0"], timeout=20,
             message=f"the worker to take a first job; worker log:\n{worker.log()}")

    page.goto("/")
    row = queue_row(page, "pausable")
    expect(row.locator("[data-status]")).to_have_text("active")
    row.locator('button[data-action="pause"]').click()
    expect(page.locator(".flash")).to_contain_text("queue pausable is paused")
    expect(queue_row(page, "pausable").locator("[data-status]")).to_have_text("paused")

    enqueue("pausable", "held", 3)
    expect(queue_row(page, "pausable").locator('td[data-count="ready"]')).to_have_text("3", timeout=10_000)
    page.wait_for_timeout(1200)  # a worker that honours the pause takes nothing in this time
    assert runs(conn, "held") == [], "a worker took jobs from a paused queue"
    assert worker.poll() is None

    queue_row(page, "pausable").locator('button[data-action="resume"]').click()
    expect(queue_row(page, "pausable").locator("[data-status]")).to_have_text("active")
    wait_for(lambda: runs(conn, "held") == ["held-0", "held-1", "held-2"], timeout=15,
             message="the resumed queue's jobs to run")


def test_an_xss_payload_is_shown_as_text(page, conn):
    job_id = task_mod.enqueue("test.record", [XSS_SCRIPT], {"html": XSS_IMG}, queue="xss")
    conn.execute("UPDATE jobs SET failed_at = now(), last_error = %s WHERE id = %s",
                 (f"Traceback (most recent call last):\nValueError: {XSS_IMG}", job_id))
    page.goto(f"/jobs/{job_id}")
    assert json.loads(page.locator('pre[data-field="args"]').inner_text()) == [XSS_SCRIPT]
    assert json.loads(page.locator('pre[data-field="kwargs"]').inner_text()) == {"html": XSS_IMG}
    expect(page.locator('pre[data-field="last_error"]')).to_contain_text(XSS_IMG)
    for path in (f"/jobs/{job_id}", "/jobs?state=dead", "/"):
        page.goto(path)
        page.wait_for_timeout(300)
        assert page.evaluate("window.__xss") is None, path
        assert page.locator("main script, main img").count() == 0, path
    assert page.dialogs == []


def test_screenshot_of_the_overview(page, conn, tmp_path):
    """Fills the dashboard with a plausible picture (the hour's throughput is synthetic) and saves
    a screenshot: into docs/dashboard.png, which the README shows, with DJ_UPDATE_SCREENSHOT=1,
    else into the test's temporary directory, so that test runs leave the work tree alone."""
    target = SCREENSHOT if os.environ.get("DJ_UPDATE_SCREENSHOT") else tmp_path / "dashboard.png"
    conn.execute("""
        INSERT INTO jobs (queue, task, args, priority)
        SELECT q, t, jsonb_build_array(i), i % 3
        FROM generate_series(1, 240) i,
             (VALUES ('default', 'storefront.create_order', 1), ('mail', 'mail.send_receipt', 3),
                     ('reports', 'reports.nightly', 9)) AS v(q, t, every)
        WHERE i % every = 0""")
    conn.execute("UPDATE jobs SET run_at = now() - interval '42 seconds' WHERE queue = 'default'")
    conn.execute("UPDATE jobs SET run_at = now() + interval '10 minutes', attempts = 2, last_error = 'TimeoutError' "
                 "WHERE id % 17 = 0")
    conn.execute("UPDATE jobs SET failed_at = now(), attempts = 25, last_error = 'SMTPRecipientsRefused' "
                 "WHERE queue = 'mail' AND id % 23 = 0")
    conn.execute("""
        INSERT INTO job_stats (bucket, queue, succeeded, failed)
        SELECT date_bin('10 seconds', now() - make_interval(secs => s), timestamptz '2000-01-01'), 'default',
               (60 + 45 * sin(s / 420.0) + (s % 70) / 7)::int,
               CASE WHEN s BETWEEN 1200 AND 1500 THEN 9 WHEN s % 130 = 0 THEN 4 ELSE 0 END
        FROM generate_series(0, 3590, 10) s""")
    conn.execute("INSERT INTO workers (name, host, pid, queues, concurrency) VALUES "
                 "('web-1:4121', 'web-1', 4121, '{default,mail}', 8), ('web-2:977', 'web-2', 977, '{reports}', 4)")
    conn.execute("INSERT INTO queue_settings (queue, paused) VALUES ('reports', true)")
    page.goto("/")
    expect(queue_row(page, "reports").locator("[data-status]")).to_have_text("paused")
    target.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(target), full_page=True)
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
