"""Alembic environment: dj's schema and the workload's, on the database dj is configured for."""

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
    # db.connect: no prepared statements behind a pooler, where they would be left on a server
    # connection that the pooler hands to someone else.
    engine = create_engine("postgresql+psycopg://", creator=lambda: db.connect(url), poolclass=NullPool)
    # One transaction for the lock and every migration: a transaction-scoped lock, not a session
    # lock, so that behind a transaction pooler it cannot stay behind on a pooled server connection.
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
