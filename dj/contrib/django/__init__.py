"""dj as a backend of Django's Tasks framework.

    TASKS = {"default": {"BACKEND": "dj.contrib.django.Backend"}}

A Django `@task`'s `.enqueue()` then writes a dj job, on Django's own connection: inside
`transaction.atomic()` the job is part of that transaction. `dj work` (or `manage.py dj_work`,
with "dj.contrib.django" in INSTALLED_APPS) runs the tasks with Django set up. See backend.py.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Importing the backend imports Django; `dj work` and dj's config look at this package first
    # without necessarily needing it.
    if name == "Backend":
        from .backend import Backend

        return Backend
    raise AttributeError(name)


def database_url() -> str | None:
    """Django's database as dj's, for commands run with DJANGO_SETTINGS_MODULE set and no
    DJ_DATABASE_URL: the alias the task backend enqueues on (OPTIONS DATABASE, "default")."""
    global _url
    if _url is None:
        _url = _database_url()
    return _url or None


_url: str | None = None


def _database_url() -> str:
    try:
        from django.conf import settings
    except ImportError:  # DJANGO_SETTINGS_MODULE is set, but not for us: dj's own default applies
        return ""
    from psycopg.conninfo import make_conninfo

    from ...errors import DJError

    try:
        backends = getattr(settings, "TASKS", {}) or {}
        alias = next((b.get("OPTIONS", {}).get("DATABASE", "default") for b in backends.values()
                      if b.get("BACKEND") == "dj.contrib.django.Backend"), "default")
        database = settings.DATABASES[alias]
    except Exception as exc:  # noqa: BLE001 - the user's settings module: any error, one line
        raise DJError(f"cannot read the database from Django's settings (DJANGO_SETTINGS_MODULE): "
                      f"{type(exc).__name__}: {exc}") from exc
    if "postgresql" not in database.get("ENGINE", ""):
        raise DJError(f"Django's DATABASES[{alias!r}] is not PostgreSQL; set DJ_DATABASE_URL for dj")
    params = {"dbname": database.get("NAME"), "user": database.get("USER"), "password": database.get("PASSWORD"),
              "host": database.get("HOST"), "port": str(database.get("PORT") or "") or None}
    return make_conninfo(**{k: v for k, v in params.items() if v})


def setup() -> None:
    """For workers: set Django up and import every installed app's `tasks` module, so that their
    Django tasks are registered with dj (modules elsewhere go in DJ_TASKS)."""
    from ...errors import DJError

    try:
        import django
        from django.utils.module_loading import autodiscover_modules
    except ImportError as exc:
        raise DJError(f"DJANGO_SETTINGS_MODULE is set but Django cannot be imported: {exc}") from exc
    try:
        django.setup()
        autodiscover_modules("tasks")
    except Exception as exc:  # noqa: BLE001 - the user's settings and apps: any error, one line
        raise DJError(f"cannot set Django up (DJANGO_SETTINGS_MODULE): {type(exc).__name__}: {exc}") from exc
