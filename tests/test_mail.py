"""The work-it mail job against a real SMTP server on loopback (aiosmtpd), sent by real workers."""

from __future__ import annotations

import socket
from email import message_from_bytes, policy

import pytest
from aiosmtpd.controller import Controller

from dj import DJError
from tasks import mail


class Inbox:
    """An aiosmtpd handler that keeps every message; addresses in `refuse` get a permanent 550."""

    def __init__(self) -> None:
        self.messages = []
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content, policy=policy.default)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"


def subject(msg) -> str:
    return str(msg["Subject"]).strip()  # a long subject is folded onto its own line, after a space


def body_of(msg) -> str:
    return msg.get_content().replace("\r\n", "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SMTPServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.inbox = Inbox()
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=port)

    def __enter__(self) -> "SMTPServer":
        self.controller.start()
        return self

    def __exit__(self, *exc) -> None:
        self.controller.stop()


@pytest.fixture
def smtp(monkeypatch):
    """A running SMTP server on a free loopback port; DJ_SMTP_URL points the workers at it."""
    with SMTPServer(free_port()) as server:
        monkeypatch.setenv("DJ_SMTP_URL", f"smtp://127.0.0.1:{server.port}")
        yield server


def test_the_message_arrives_with_the_thought(smtp, cli, run_burst, conn):
    thought = "What if the moon is just a very far away streetlight?"
    result = cli("enqueue", "mail", "--email", "Reader@Example.COM", "--thought", thought)
    assert result.returncode == 0, result.stderr
    assert "enqueued job" in result.stdout
    (queue, args), = conn.execute("SELECT queue, args FROM jobs").fetchall()
    assert queue == "mail" and args == ["Reader@example.com", thought]  # the domain is normalized

    run_burst(("mail",))

    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    (sender, rcpts, msg), = smtp.inbox.messages
    assert rcpts == ["Reader@example.com"] and msg["To"] == "Reader@example.com"
    assert "randomness@work-it.localhost" in sender
    assert subject(msg) == f"Your random thought: {thought}"
    body = body_of(msg)
    assert thought in body and "giphy.com/search/" in body


def test_python_api_enqueues_on_the_mail_queue(smtp, run_burst, conn):
    job_id = mail.enqueue_mail("a@b.co", "two\nlines", priority=3)
    assert conn.execute("SELECT queue, priority FROM jobs WHERE id = %s", (job_id,)).fetchone() == ("mail", 3)
    run_burst(("mail",))
    (_, _, msg), = smtp.inbox.messages
    assert subject(msg) == "Your random thought: two lines"  # a header cannot carry the line break
    assert "two\nlines" in body_of(msg)


def test_invalid_address_is_refused_at_enqueue(cli, conn):
    for address in ["not-an-address", "a@", "@b.c", "a b@c.d", "a@b..c", "a@b.c\nBcc: x@y.z"]:
        with pytest.raises(DJError, match="invalid email address"):
            mail.enqueue_mail(address, "hi")
    with pytest.raises(DJError, match="the thought must be a non-empty string"):
        mail.enqueue_mail("a@b.co", "  ")
    result = cli("enqueue", "mail", "--email", "not-an-address", "--thought", "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid email address 'not-an-address'")
    assert len(result.stderr.strip().splitlines()) == 1
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0


def test_smtp_down_retries_with_backoff_then_succeeds(monkeypatch, run_burst, conn):
    port = free_port()  # nothing listens here yet
    monkeypatch.setenv("DJ_SMTP_URL", f"smtp://127.0.0.1:{port}")
    job_id = mail.enqueue_mail("later@example.com", "patience")

    run_burst(("mail",))

    attempts, waits, failed_at, error = conn.execute(
        "SELECT attempts, run_at > now() + interval '4 seconds', failed_at, last_error FROM jobs WHERE id = %s",
        (job_id,)).fetchone()
    assert attempts == 1 and waits and failed_at is None  # backoff: 1**4 + 5 s, the job is scheduled
    assert f"cannot connect to the SMTP server at smtp://127.0.0.1:{port}" in error
    assert "Connection refused" in error

    with SMTPServer(port) as server:
        conn.execute("UPDATE jobs SET run_at = now() WHERE id = %s", (job_id,))
        run_burst(("mail",))
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
        (_, rcpts, msg), = server.inbox.messages
    assert rcpts == ["later@example.com"] and "patience" in subject(msg)


def test_permanent_rejection_of_the_recipient_makes_the_job_dead(smtp, run_burst, conn):
    smtp.inbox.refuse.add("nobody@example.com")
    job_id = mail.enqueue_mail("nobody@example.com", "into the void")
    run_burst(("mail",))
    attempts, failed_at, error = conn.execute(
        "SELECT attempts, failed_at, last_error FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert attempts == 1 and failed_at is not None  # dead at once: retrying a 550 cannot help
    assert "Permanent" in error and "550" in error and "nobody@example.com" in error
    assert smtp.inbox.messages == []


@pytest.mark.no_database
def test_smtp_url_parsing(monkeypatch):
    monkeypatch.delenv("DJ_SMTP_URL", raising=False)
    assert mail.smtp_settings() == mail.SMTPSettings("localhost", 1025)
    s = mail.smtp_settings("smtp://me%40x.org:p%3Ass@mail.example.org:587?starttls=1")
    assert (s.host, s.port, s.starttls, s.tls, s.user, s.password) == (
        "mail.example.org", 587, True, False, "me@x.org", "p:ss")
    assert "p:ss" not in s.display()
    s = mail.smtp_settings("smtps://mail.example.org")
    assert (s.port, s.tls, s.starttls) == (465, True, False)
    assert mail.smtp_settings("smtp://mx.example.org").port == 25
    with pytest.raises(ValueError, match="smtp://"):
        mail.smtp_settings("http://example.org")
