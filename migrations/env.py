"""Alembic environment: dj's schema and the workload's, on the database dj is configured for."""

import psycopg
from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from dj import db, models
from tasks import schema as workload

target_metadata = [models.metadata, workload.metadata]

# Any number to serialize concurrent `dj migrate` runs; it only has to be the same for all of them.
MIGRATION_LOCK = 0x646A6D67


def run_migrations_online() -> None:
    url = context.config.attributes.get("url") or db.database_url()
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url), poolclass=NullPool)
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
        try:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
            connection.commit()


run_migrations_online()
