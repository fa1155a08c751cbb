"""examples/work_it, the tutorials' app: its POST in dj's test mode, then end to end with a real
worker and a real SMTP server, then `dj demo work-it`."""

from __future__ import annotations

import time

import pytest
from aiosmtpd.controller import Controller
from starlette.testclient import TestClient

from examples.work_it.app import create_app
from examples.work_it.loadtest import _free_port
from examples.work_it.mailcatcher import Inbox
from tests.conftest import wait_for

FORM = {"email": "ada@example.com", "thought": "tea is a hug in a cup"}


@pytest.fixture
def app_client(db_url):
    with TestClient(create_app(db_url, inline=False)) as client:
        yield client


def test_a_post_enqueues_exactly_one_mail_job_with_its_arguments(app_client, dj_jobs):
    r = app_client.post("/thoughts", data=FORM)
    assert r.status_code == 200 and "on its way" in r.text
    [job] = dj_jobs.jobs
    assert (job.task, job.args, job.kwargs, job.queue) == (
        "mail.send_randomness_email", ["ada@example.com", FORM["thought"]], {}, "mail")


def test_a_rolled_back_request_enqueues_nothing(app_client, dj_jobs, conn):
    assert app_client.post("/thoughts", data=FORM).status_code == 200
    again = app_client.post("/thoughts", data=FORM)  # the same thought: its INSERT fails, the transaction rolls back
    assert again.status_code == 409
    assert len(dj_jobs.jobs) == 1
    assert app_client.post("/thoughts", data={"email": "not an address", "thought": "x"}).status_code == 400
    assert len(dj_jobs.jobs) == 1
    assert conn.execute("SELECT count(*) FROM work_it_thoughts").fetchone()[0] == 1


def test_the_job_rolls_back_with_the_request_on_the_real_database(app_client, conn):
    assert app_client.post("/thoughts", data=FORM).status_code == 200
    assert app_client.post("/thoughts", data=FORM).status_code == 409
    assert conn.execute("SELECT count(*) FROM jobs WHERE task = 'mail.send_randomness_email'").fetchone()[0] == 1


@pytest.fixture
def smtp():
    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, f"smtp://127.0.0.1:{port}"
    controller.stop()


def test_end_to_end_the_mail_arrives_once(app_client, smtp, worker_process, conn):
    inbox, smtp_url = smtp
    worker = worker_process("--queues", "mail", env={"DJ_SMTP_URL": smtp_url, "DJ_GIPHY_DELAY": "0.05"})
    assert app_client.post("/thoughts", data=FORM).status_code == 200
    wait_for(lambda: inbox.mails, timeout=30, message="the mail")
    time.sleep(1.0)  # time for a duplicate to arrive, if one were coming
    assert [(m.to, m.subject) for m in inbox.mails] == [(["ada@example.com"], f"Your random thought: {FORM['thought']}")]
    assert "giphy" in inbox.mails[0].body
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0, message="the job to be done")
    assert "Traceback" not in worker.log()


def test_dj_demo_work_it_measures_both_modes_and_every_mail_arrives(cli):
    result = cli("demo", "work-it", "--forms", "20", "--clients", "5", env={"DJ_GIPHY_DELAY": "0.05"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "in the request" in result.stdout and "enqueued" in result.stdout
    assert result.stdout.count("20 / 20") == 2
