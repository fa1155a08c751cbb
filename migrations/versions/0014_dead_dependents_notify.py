"""Dependents killed by a dead or cancelled dependency are announced on dj_results

Revision ID: 0014_dead_dependents_notify
Revises: 0013_job_results
"""

import importlib.util
from pathlib import Path

from alembic import op

revision = "0014_dead_dependents_notify"
down_revision = "0013_job_results"
branch_labels = None
depends_on = None


def _settle_0009() -> str:
    """dj_settle_dependents as 0009 created it. Read from that revision's file rather than copied,
    so the two stay one text: this revision changes one line of it."""
    path = Path(__file__).with_name("0009_dependencies.py")
    spec = importlib.util.spec_from_file_location("dj_migration_0009", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.SETTLE).replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


# A dependent that dies here ends the waits of dj.result() on it at once, as FAIL's deaths do
# (dj/results.py listens on dj_results), instead of at their next fallback poll.
KILLED = "RETURNING jobs.id, jobs.batch_id, jobs.last_error\n"
KILLED_TOLD = "RETURNING jobs.id, jobs.batch_id, jobs.last_error, pg_notify('dj_results', jobs.id::text)\n"


def upgrade() -> None:
    settle = _settle_0009()
    assert settle.count(KILLED) == 1
    op.execute(settle.replace(KILLED, KILLED_TOLD))


def downgrade() -> None:
    op.execute(_settle_0009())
