"""The app factory and `dj web`'s server."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from .. import db, snapshot
from ..errors import DJError
from . import metrics
from .routes import ROUTES
from .security import Guard, Secrets, is_loopback_host

HERE = Path(__file__).resolve().parent


def create_app(database_url: str | None = None, token: str | None = None, *, key: bytes | None = None) -> Starlette:
    """The dashboard as an ASGI app. `token` (or none) decides whether requests must authenticate;
    without one the app answers only to loopback host names."""
    url = database_url or db.database_url()
    app = Starlette(routes=[*ROUTES, Mount("/static", StaticFiles(directory=HERE / "static"), name="static")])
    app.state.secrets = Secrets(token, key)
    app.state.connection = lambda: db.pool(url).connection()
    app.state.templates = _templates()
    app.state.registry = metrics.registry(app.state.connection)
    app.add_middleware(Guard, secrets_=app.state.secrets, loopback_only=not token)
    return app


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["age"] = _age
    env.filters["when"] = _when
    env.filters["num"] = lambda n: f"{n:,}"
    env.globals["snapshot_warn_after"] = snapshot.warn_after()
    return env


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(t: datetime | None, now: datetime | None = None) -> str:
    """'2026-01-31 09:00:00 UTC (in 25s)' or '(3m ago)'."""
    if t is None:
        return ""
    now = now or datetime.now(timezone.utc)
    delta = (t - now).total_seconds()
    rel = f"in {_age(delta)}" if delta > 0.5 else f"{_age(-delta)} ago" if delta < -0.5 else "now"
    return f"{t.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({rel})"


def check_host(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token: it would let anyone who can reach the
    port retry, cancel and pause jobs."""
    if not token and not is_loopback_host(host):
        raise DJError(
            f"refusing to listen on {host or 'all interfaces'} without a token: anyone who can reach it could "
            "retry, cancel and pause jobs; pass --token or set DJ_WEB_TOKEN, or use --host 127.0.0.1")


def serve(host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          database_url: str | None = None) -> None:
    """`dj web`: check the host, the database and the port, then serve until Ctrl-C / SIGTERM."""
    import uvicorn

    token = token or None
    check_host(host, token)
    if not 0 <= port <= 65535:
        raise DJError(f"--port {port} is not a port number (0-65535)")
    db.use_database(database_url)
    url = db.database_url()
    with db.connect(url, autocommit=True) as conn:
        db.ensure_schema(conn)
        if not conn.execute("SELECT to_regclass('queue_settings') IS NOT NULL").fetchone()[0]:
            raise DJError("the database's dj schema is older than this dj (no queue_settings table); "
                          "run 'dj migrate'")
    sock = _listen(host, port)
    app = create_app(url, token)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"dj web: serving http://{shown}:{bound[1]}/ ({'token required' if token else 'no token: loopback only'})"
          "; Ctrl-C stops it", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            timeout_graceful_shutdown=1)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # SIGTERM/SIGINT is how dj web is meant to stop: exit 0 instead of re-raising the signal.
            getattr(self, "_captured_signals", []).clear()

    Server(config).run(sockets=[sock])
    print("dj web: stopped", flush=True)


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DJError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise DJError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
