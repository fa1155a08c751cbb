"""The mail job of the tutorial's "work-it" app: an email about the thought someone typed in.

In work-it, a form takes an email address and a random thought, and
`UserNotifier.send_randomness_email(email, thought)` mails the thought back with a GIF about it.
Sending inside the request is slow, which is the tutorial's reason for a background job. Here the
job builds the message (naming the thought, with a GIF search link for it; nothing is fetched) and
sends it over SMTP to DJ_SMTP_URL:

    smtp://[user:password@]host[:port][?starttls=1]     plain SMTP, optionally upgraded with STARTTLS
    smtps://[user:password@]host[:port]                 SMTP over TLS

The default is smtp://localhost:1025, mailcatcher's port. The port defaults to 25 (smtp) or 465
(smtps) when the URL has none. DJ_MAIL_FROM sets the sender, DJ_SMTP_TIMEOUT the socket timeout.

Before sending, the job "fetches a giphy" for the thought, as work-it's mailer does: an external
call that takes DJ_GIPHY_DELAY seconds (a number, or a range "0.1-0.3", the default). No network
is reached; the delay is the point, since it is what made work-it's requests slow.

Failures: an unreachable server, a dropped connection or a 4xx reply raises, so the job is retried
with dj's backoff. A 5xx reply that refuses the recipient or the message is permanent
(`dj.Permanent`): the job is dead at once, since sending it again cannot help.
"""

from __future__ import annotations

import os
import random
import smtplib
import time
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from dj import DJError, Permanent, job

DEFAULT_SMTP_URL = "smtp://localhost:1025"
DEFAULT_FROM = "work-it <randomness@work-it.localhost>"
DEFAULT_TIMEOUT = 10.0
MAX_THOUGHT_CHARS = 2000
SUBJECT_CHARS = 80


class SMTPUnavailable(RuntimeError):
    """The SMTP server could not be reached or dropped the connection; the job will be retried."""


@dataclass(frozen=True)
class SMTPSettings:
    host: str
    port: int
    tls: bool = False  # smtps: TLS from the first byte
    starttls: bool = False
    user: str | None = None
    password: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    def display(self) -> str:
        scheme = "smtps" if self.tls else "smtp"
        return f"{scheme}://{self.host}:{self.port}"  # never the password


def smtp_settings(url: str | None = None) -> SMTPSettings:
    """Parse DJ_SMTP_URL (or `url`). Raises ValueError for a URL that is not smtp:// or smtps://."""
    url = url or os.environ.get("DJ_SMTP_URL") or DEFAULT_SMTP_URL
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError(f"DJ_SMTP_URL must start with smtp:// or smtps://, got scheme {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("DJ_SMTP_URL has an invalid port") from None
    query = parse_qs(parts.query)
    starttls = query.get("starttls", ["0"])[-1].lower() in ("1", "true", "yes", "on")
    timeout = float(os.environ.get("DJ_SMTP_TIMEOUT") or DEFAULT_TIMEOUT)
    return SMTPSettings(
        host=parts.hostname or "localhost",
        port=port or (465 if parts.scheme == "smtps" else 25),
        tls=parts.scheme == "smtps",
        starttls=starttls and parts.scheme == "smtp",
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        timeout=timeout,
    )


DEFAULT_GIPHY_DELAY = "0.1-0.3"


def giphy_delay(setting: str | None = None) -> float:
    """Seconds the simulated giphy call takes: DJ_GIPHY_DELAY, a number or a range "low-high"."""
    text = (setting if setting is not None else os.environ.get("DJ_GIPHY_DELAY")) or DEFAULT_GIPHY_DELAY
    try:
        low, _, high = text.partition("-")
        low_s, high_s = float(low), float(high or low)
    except ValueError:
        raise ValueError(f"DJ_GIPHY_DELAY must be seconds or a range like 0.1-0.3, got {text!r}") from None
    if not 0 <= low_s <= high_s:
        raise ValueError(f"DJ_GIPHY_DELAY must be a non-negative range, got {text!r}")
    return random.uniform(low_s, high_s)


def fetch_giphy(thought: str) -> str:
    """Stands in for work-it's call to the giphy API: waits like one, returns a GIF's address."""
    time.sleep(giphy_delay())
    return f"https://media.giphy.example/{quote(' '.join(thought.split())[:60], safe='')}.gif"


def build_message(email: str, thought: str, sender: str | None = None) -> EmailMessage:
    """The randomness email: it names the thought in the subject and the body."""
    one_line = " ".join(thought.split())  # a header cannot hold line breaks
    short = one_line if len(one_line) <= SUBJECT_CHARS else one_line[: SUBJECT_CHARS - 3] + "..."
    msg = EmailMessage()
    msg["From"] = sender or os.environ.get("DJ_MAIL_FROM") or DEFAULT_FROM
    msg["To"] = email
    msg["Subject"] = f"Your random thought: {short}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="work-it.localhost")
    msg.set_content(
        "Hello!\n\n"
        "You shared a random thought with Work-It:\n\n"
        f"    {thought}\n\n"
        "Here are some GIFs about it:\n"
        f"https://giphy.com/search/{quote(one_line[:200], safe='')}\n\n"
        "-- Work-It, sent from a background job\n"
    )
    return msg


def send(msg: EmailMessage, settings: SMTPSettings | None = None) -> None:
    """Send one message. Raises SMTPUnavailable or an smtplib error to retry, dj.Permanent on a 5xx refusal."""
    s = settings or smtp_settings()
    try:
        if s.tls:
            client: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout,
                                                    context=ssl.create_default_context())
        else:
            client = smtplib.SMTP(s.host, s.port, timeout=s.timeout)
    except (OSError, smtplib.SMTPConnectError) as exc:  # refused, unreachable, timed out, bad greeting
        raise SMTPUnavailable(f"cannot connect to the SMTP server at {s.display()}: {exc}") from exc
    try:
        with client:
            if s.starttls:
                client.starttls(context=ssl.create_default_context())
            if s.user:
                client.login(s.user, s.password or "")
            client.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        if codes and all(500 <= code < 600 for code in codes):
            raise Permanent(f"the SMTP server at {s.display()} refused the recipient(s): {_replies(exc.recipients)}") \
                from exc
        raise
    except smtplib.SMTPDataError as exc:
        if 500 <= exc.smtp_code < 600:
            raise Permanent(f"the SMTP server at {s.display()} refused the message: {exc.smtp_code} "
                            f"{_text(exc.smtp_error)}") from exc
        raise
    except smtplib.SMTPServerDisconnected as exc:
        raise SMTPUnavailable(f"the SMTP server at {s.display()} closed the connection: {exc}") from exc
    except OSError as exc:
        if isinstance(exc, smtplib.SMTPException):
            raise
        raise SMTPUnavailable(f"lost the connection to the SMTP server at {s.display()}: {exc}") from exc


@job(name="mail.send_randomness_email", queue="mail", timeout=120)
def send_randomness_email(email: str, thought: str) -> None:
    """work-it's UserNotifier.send_randomness_email(email, thought).deliver_now, as a job."""
    gif = fetch_giphy(thought)
    msg = build_message(email, thought)
    msg.add_header("X-Giphy", gif)
    send(msg)


def validate_address(email: str) -> str:
    """The normalized address, or DJError. Only the syntax is checked: no DNS look-up."""
    from email_validator import EmailNotValidError, validate_email

    if not isinstance(email, str):
        raise DJError(f"invalid email address {email!r}: not a string")
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise DJError(f"invalid email address {email!r}: {exc}") from None


def enqueue_mail(email: str, thought: str, **options: Any) -> int:
    """Validate the address and the thought, then enqueue send_randomness_email; returns the job id.

    `options` are enqueue options (queue, priority, run_at, conn, ...). Raises DJError for an
    invalid address or an empty thought, and writes nothing then.
    """
    address = validate_address(email)
    if not isinstance(thought, str) or not thought.strip():
        raise DJError("the thought must be a non-empty string")
    if len(thought) > MAX_THOUGHT_CHARS:
        raise DJError(f"the thought is {len(thought)} characters long; at most {MAX_THOUGHT_CHARS} fit in the email")
    return send_randomness_email.using(**options).enqueue(address, thought)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _replies(recipients: dict) -> str:
    return "; ".join(f"{rcpt}: {code} {_text(text)}" for rcpt, (code, text) in recipients.items())
