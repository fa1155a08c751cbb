"""A small mailcatcher: an SMTP server that keeps what it receives, and a page to read it.

    python -m examples.work_it.mailcatcher [--smtp 1025] [--http 1080]

As the tutorials' readers watched mailcatcher at :1080; `/messages.json` is the same as data.
"""

from __future__ import annotations

import argparse
import html
import threading
import time
from dataclasses import asdict, dataclass
from email import message_from_bytes, policy

import uvicorn
from aiosmtpd.controller import Controller
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route


@dataclass
class Mail:
    sender: str
    to: list[str]
    subject: str
    body: str
    received_at: float


class Inbox:
    """aiosmtpd's handler: every message it accepts is kept, in order."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's name
        msg = message_from_bytes(envelope.content, policy=policy.default)
        body = msg.get_body(("plain",))
        with self._lock:
            self.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), str(msg["Subject"] or ""),
                                   body.get_content() if body else "", time.time()))
        return "250 Message accepted for delivery"


def web(inbox: Inbox) -> Starlette:
    async def page(request) -> HTMLResponse:
        rows = "".join(f"<tr><td>{html.escape(', '.join(m.to))}</td><td>{html.escape(m.subject)}</td>"
                       f"<td><pre>{html.escape(m.body)}</pre></td></tr>" for m in reversed(inbox.mails))
        return HTMLResponse(f"<!doctype html><title>Inbox</title><h1>Inbox: {len(inbox.mails)} mail(s)</h1>"
                            f"<table><tr><th>to</th><th>subject</th><th>body</th></tr>{rows}</table>")

    async def messages(request) -> JSONResponse:
        return JSONResponse([asdict(m) for m in inbox.mails])

    return Starlette(routes=[Route("/", page), Route("/messages.json", messages)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smtp", type=int, default=1025, help="SMTP port (1025)")
    parser.add_argument("--http", type=int, default=1080, help="inbox page port (1080)")
    parser.add_argument("--host", default="127.0.0.1")
    options = parser.parse_args()
    inbox = Inbox()
    controller = Controller(inbox, hostname=options.host, port=options.smtp)
    controller.start()
    try:
        uvicorn.run(web(inbox), host=options.host, port=options.http, log_level="warning")
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
