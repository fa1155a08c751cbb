"""Where dj's settings come from: flags first, then the environment, then defaults."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path


def home() -> Path:
    explicit = os.environ.get("DJ_HOME")
    if explicit:
        path = Path(explicit).expanduser()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import platformdirs

            path = Path(platformdirs.user_data_dir("dj"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def configured_url() -> str | None:
    """The URL the user chose, or None when dj should use its embedded server. In a Django project
    (DJANGO_SETTINGS_MODULE set), Django's database unless DJ_DATABASE_URL says otherwise."""
    explicit = os.environ.get("DJ_DATABASE_URL")
    if explicit:
        return explicit
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        from .contrib.django import database_url

        return database_url()
    return None


def listen_url() -> str | None:
    """DJ_LISTEN_URL: a direct URL to the same database, for workers to LISTEN on when
    DJ_DATABASE_URL goes through a transaction pooler (see dj/pooler.py)."""
    return os.environ.get("DJ_LISTEN_URL") or None


def task_modules() -> list[str]:
    raw = os.environ.get("DJ_TASKS", "")
    return [m.strip() for m in raw.split(",") if m.strip()]


_PASSWORD_IN_URL = re.compile(r"(://[^:/?#@]*:)([^@/?#]*)(@)")
_PASSWORD_IN_QUERY = re.compile(r"(?i)(password=)([^&\s]*)")
_PASSWORD_IN_DSN = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)")


def mask_url(url: str) -> str:
    """Hide the password of a URL or key=value DSN so it can be printed or logged."""
    if "://" in url:
        url = _PASSWORD_IN_URL.sub(lambda m: m.group(1) + ("***" if m.group(2) else "") + m.group(3), url)
        return _PASSWORD_IN_QUERY.sub(r"\1***", url)
    return _PASSWORD_IN_DSN.sub(r"\1***", url)


def mask_secrets(text: str, url: str | None) -> str:
    """Remove a URL's password from free text such as a driver error message."""
    if url:
        m = _PASSWORD_IN_URL.search(url) or _PASSWORD_IN_QUERY.search(url) or _PASSWORD_IN_DSN.search(url)
        if m and m.group(2):
            text = text.replace(m.group(2), "***")
    return text
