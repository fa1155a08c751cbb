"""The dashboard's guard: one ASGI middleware in front of every route.

In order, for each HTTP request:
1. **Host.** Without a token the server answers only to loopback names (localhost, 127.0.0.0/8,
   ::1) in the Host header, so a web page that rebinds its own DNS name to 127.0.0.1 cannot drive
   the dashboard from the user's browser.
2. **Token.** With a token, every request except the login page and the static files needs either
   `Authorization: Bearer TOKEN` or the session cookie that the login form sets. Pages redirect to
   the login form; everything else (htmx fragments, /metrics) gets 401.
3. **CSRF.** Every POST, whatever its route, must carry a form field `csrf` (or an `X-CSRF-Token`
   header) that matches the `dj_csrf` cookie: the cookie holds a random nonce and the field its
   HMAC under the server's secret, so neither can be forged from the other. A POST whose Origin
   header names another site is refused too. The guard reads the (small, url-encoded) body itself
   and hands the parsed form to the route as `request.state.form`.
4. **Headers.** Every response gets a strict Content-Security-Policy (scripts only from /static,
   so even a markup bug could not run an injected script), `X-Frame-Options: DENY`, nosniff and
   `Referrer-Policy: same-origin`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

CSRF_COOKIE = "dj_csrf"
SESSION_COOKIE = "dj_session"
SESSION_SECONDS = 12 * 3600
MAX_FORM_BYTES = 64 * 1024

# Reachable without logging in, even when a token is set.
PUBLIC_PATHS = ("/login",)
PUBLIC_PREFIXES = ("/static/",)

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1), with or without [brackets]."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a Host header: 'a:8000' -> 'a', '[::1]:8000' -> '[::1]'."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Secrets:
    """The server's HMAC key, the token, and what is derived from them."""

    def __init__(self, token: str | None, key: bytes | None = None):
        self.token = token or None
        self.key = key or secrets.token_bytes(32)

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    def csrf_for(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, sent: str | None) -> bool:
        return bool(nonce and sent) and hmac.compare_digest(self.csrf_for(nonce), sent)

    def token_ok(self, sent: str | None) -> bool:
        return self.token is not None and sent is not None and hmac.compare_digest(
            sent.encode(), self.token.encode())

    def new_session(self) -> str:
        expires = str(int(time.time()) + SESSION_SECONDS)
        return f"{expires}.{self._mac('session', expires)}"

    def session_ok(self, cookie: str | None) -> bool:
        if not cookie or "." not in cookie:
            return False
        expires, mac = cookie.split(".", 1)
        return (expires.isdigit() and int(expires) > time.time()
                and hmac.compare_digest(self._mac("session", expires), mac))


def safe_next(target: str | None, default: str = "/") -> str:
    """A local path to go back to after a login or an action; never another site."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


class Guard:
    def __init__(self, app, secrets_: Secrets, *, loopback_only: bool):
        self.app = app
        self.secrets = secrets_
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path = scope["path"]
        method = scope["method"]
        state: dict[str, Any] = scope.setdefault("state", {})

        cookies = Request(scope).cookies
        nonce = cookies.get(CSRF_COOKIE)
        new_nonce = None
        if not nonce or len(nonce) != 32 or not all(c in "0123456789abcdef" for c in nonce):
            nonce = new_nonce = secrets.token_hex(16)
        state["csrf"] = self.secrets.csrf_for(nonce)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if new_nonce:
                    extra.append((b"set-cookie", (f"{CSRF_COOKIE}={new_nonce}; Path=/; HttpOnly; "
                                                  f"SameSite=Strict").encode()))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        async def refuse(response: Response):
            await response(scope, receive, send_with_headers)

        # 1. Host
        if self.loopback_only and not is_loopback_host(_host_of(headers.get("host", ""))):
            return await refuse(PlainTextResponse(
                "this dashboard runs without a token, so it answers only to localhost/127.0.0.1 "
                "(start it with --token to serve other names)", 400))

        # 2. Token
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        authed = self.secrets.token is None
        if not authed:
            scheme, _, sent = headers.get("authorization", "").partition(" ")
            authed = (scheme.lower() == "bearer" and self.secrets.token_ok(sent.strip())) or \
                self.secrets.session_ok(cookies.get(SESSION_COOKIE))
        state["authed"] = authed
        state["token_required"] = self.secrets.token is not None
        if not authed and not public:
            wants_page = (method == "GET" and "text/html" in headers.get("accept", "")
                          and not headers.get("hx-request"))
            if wants_page:
                target = path + ("?" + scope["query_string"].decode() if scope.get("query_string") else "")
                return await refuse(RedirectResponse("/login?next=" + quote(target, safe=""), 303))
            return await refuse(PlainTextResponse(
                "authentication required: send 'Authorization: Bearer TOKEN' or log in at /login", 401,
                headers={"WWW-Authenticate": 'Bearer realm="dj"'}))

        # 3. CSRF on every POST (and on any other method that changes things)
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin and origin != "null":
                o = urlsplit(origin)
                if o.netloc.lower() != headers.get("host", "").lower():
                    return await refuse(PlainTextResponse(
                        f"cross-origin request refused (Origin {origin})", 403))
            body = b""
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > MAX_FORM_BYTES:
                    return await refuse(PlainTextResponse("request body too large", 413))
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            form: dict[str, str] = {}
            if body:
                if ctype != "application/x-www-form-urlencoded":
                    return await refuse(PlainTextResponse("send forms as application/x-www-form-urlencoded",
                                                          415))
                try:
                    form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
                except UnicodeDecodeError:
                    return await refuse(PlainTextResponse("the form is not UTF-8", 400))
            sent = form.get("csrf") or headers.get("x-csrf-token")
            if new_nonce or not self.secrets.csrf_ok(nonce, sent):
                return await refuse(PlainTextResponse(
                    "CSRF check failed: the form's token does not match this browser's cookie. "
                    "Reload the page and try again.", 403))
            state["form"] = form

            replayed = False

            async def replay():  # the body once, then the real channel (for http.disconnect)
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send_with_headers)

        await self.app(scope, receive, send_with_headers)
