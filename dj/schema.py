"""`dj migrate`: Alembic upgrade to head, run programmatically."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import migrations

from . import db


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str | None = None) -> str:
    """Bring the schema to the newest revision; safe to run any number of times. Returns the head."""
    url = url or db.database_url()
    db.connect(url).close()
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(cfg).get_current_head()
