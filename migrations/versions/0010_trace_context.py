"""The OpenTelemetry span context of a job's enqueue (dj/tracing.py)

Revision ID: 0010_trace_context
Revises: 0009_dependencies
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0010_trace_context"
down_revision = "0009_dependencies"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable with no default: adding it rewrites no row, and a NULL takes no bytes beyond the
    # null bitmap that a row of jobs has anyway (batch_id, locked_by... are NULL in most).
    op.add_column("jobs", sa.Column("trace_context", pg.JSONB))


def downgrade() -> None:
    op.drop_column("jobs", "trace_context")
