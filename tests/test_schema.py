"""The migrations and dj/models.py describe one schema: every table, column and index of the
core that the models declare is what `dj migrate` creates (tests/test_workload_seed.py does the
same for the workload's tables)."""

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from dj import models


def test_the_migrations_create_what_the_core_models_describe(db_url):
    metadata = models.Base.metadata
    core = set(metadata.tables)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    only_core = {"include_name": lambda name, kind, parent: kind != "table" or name in core}
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts=only_core), metadata)
    engine.dispose()
    assert diff == []
    assert {"jobs", "job_results", "job_dependencies"} <= core
