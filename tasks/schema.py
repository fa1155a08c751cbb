"""Tables of the workload: a storefront and a Q&A board.

Migration 0002_workload creates the same tables; tests check that the two agree.
The counter columns are caches: the seeders leave them at 0 and `tasks.counters`
rebuilds them.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

metadata = MetaData()

TABLES = ("users", "items", "orders", "order_items", "questions", "answers")


class Base(DeclarativeBase):
    metadata = metadata


class Record:
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


def counter() -> Mapped[int]:
    return mapped_column(Integer, nullable=False, server_default=text("0"))


class User(Record, Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(Text, nullable=False)
    email: Mapped[str] = mapped_column(Text, nullable=False)
    orders_count: Mapped[int] = counter()


class Item(Record, Base):
    __tablename__ = "items"

    name: Mapped[str] = mapped_column(Text, nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False)
    image_url: Mapped[str] = mapped_column(Text, nullable=False)
    orders_count: Mapped[int] = counter()


class Order(Record, Base):
    __tablename__ = "orders"

    user_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2), nullable=False)
    items_count: Mapped[int] = counter()

    # The counter rebuild aggregates orders by user over an id range.
    __table_args__ = (Index("ix_orders_user_id", "user_id"),)


class OrderItem(Record, Base):
    __tablename__ = "order_items"

    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False
    )
    item_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("items.id", ondelete="CASCADE"), nullable=False
    )

    # Both counter rebuilds that read order_items aggregate over a range of one of these.
    __table_args__ = (
        Index("ix_order_items_order_id", "order_id"),
        Index("ix_order_items_item_id", "item_id"),
    )


class Question(Record, Base):
    __tablename__ = "questions"

    title: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    answers_count: Mapped[int] = counter()
    approved_answers_count: Mapped[int] = counter()


class Answer(Record, Base):
    __tablename__ = "answers"

    question_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("questions.id", ondelete="CASCADE"), nullable=False
    )
    body: Mapped[str] = mapped_column(Text, nullable=False)
    approved: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))

    # INCLUDE (approved) lets the rebuild count both counters of a range of questions
    # from the index alone, without visiting the answers' heap pages.
    __table_args__ = (
        Index("ix_answers_question_id", "question_id", postgresql_include=["approved"]),
    )
