"""Workload tables: the storefront and the Q&A board (see tasks/schema.py).

Revision ID: 0002_workload
Revises: 0001_core
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_workload"
down_revision = "0001_core"
branch_labels = None
depends_on = None


def _record_columns() -> list[sa.Column]:
    return [
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    ]


def _counter(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer, nullable=False, server_default=sa.text("0"))


def _parent(name: str, table: str) -> sa.Column:
    return sa.Column(
        name, sa.BigInteger, sa.ForeignKey(f"{table}.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "users",
        *_record_columns(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        _counter("orders_count"),
    )
    op.create_table(
        "items",
        *_record_columns(),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("image_url", sa.Text, nullable=False),
        _counter("orders_count"),
    )
    op.create_table(
        "orders",
        *_record_columns(),
        _parent("user_id", "users"),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        _counter("items_count"),
    )
    op.create_table(
        "order_items",
        *_record_columns(),
        _parent("order_id", "orders"),
        _parent("item_id", "items"),
    )
    op.create_table(
        "questions",
        *_record_columns(),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        _counter("answers_count"),
        _counter("approved_answers_count"),
    )
    op.create_table(
        "answers",
        *_record_columns(),
        _parent("question_id", "questions"),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("approved", sa.Boolean, nullable=False, server_default=sa.text("false")),
    )

    # The counter rebuilds aggregate children over a range of parent ids.
    op.create_index("ix_orders_user_id", "orders", ["user_id"])
    op.create_index("ix_order_items_order_id", "order_items", ["order_id"])
    op.create_index("ix_order_items_item_id", "order_items", ["item_id"])
    # INCLUDE (approved): both question counters come from the index alone.
    op.create_index(
        "ix_answers_question_id", "answers", ["question_id"], postgresql_include=["approved"]
    )


def downgrade() -> None:
    for table in ("answers", "questions", "order_items", "orders", "items", "users"):
        op.drop_table(table)
