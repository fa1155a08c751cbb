"""`dj web`: the dashboard. Server-rendered with Starlette and Jinja2; htmx (vendored in static/)
refreshes the live parts. See dj/web/security.py for what guards it."""

from .app import check_host, create_app, serve

__all__ = ["check_host", "create_app", "serve"]
