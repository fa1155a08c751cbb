"""Per-key limits: jobs carry a limit key and its limit, and have a claim index of their own

Revision ID: 0011_limit_keys
Revises: 0010_trace_context
"""

import sqlalchemy as sa
from alembic import op

revision = "0011_limit_keys"
down_revision = "0010_trace_context"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("limit_key", sa.Text))
    op.add_column("jobs", sa.Column("key_limit", sa.Integer))
    # Keyed jobs leave the plain claim index (see dj/models.py): rebuilt with the new predicate.
    op.drop_index("jobs_claim_idx", table_name="jobs")
    op.create_index("jobs_claim_idx", "jobs", ["queue", "priority", "run_at", "id"],
                    postgresql_where=sa.text("locked_by IS NULL AND failed_at IS NULL AND limit_key IS NULL"))
    op.create_index("jobs_keyed_idx", "jobs", ["queue", "limit_key", "priority", "run_at", "id"],
                    postgresql_where=sa.text("locked_by IS NULL AND failed_at IS NULL AND limit_key IS NOT NULL"))
    op.create_index("jobs_keyed_running_idx", "jobs", ["limit_key"],
                    postgresql_where=sa.text("locked_by IS NOT NULL AND limit_key IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("jobs_keyed_running_idx", table_name="jobs")
    op.drop_index("jobs_keyed_idx", table_name="jobs")
    op.drop_index("jobs_claim_idx", table_name="jobs")
    op.create_index("jobs_claim_idx", "jobs", ["queue", "priority", "run_at", "id"],
                    postgresql_where=sa.text("locked_by IS NULL AND failed_at IS NULL"))
    op.drop_column("jobs", "key_limit")
    op.drop_column("jobs", "limit_key")
