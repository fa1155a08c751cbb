"""dj from sync code: a SQLAlchemy Session (a Flask view or a script would look the same).

place_order() inserts an order and enqueues its invoice in one transaction: both are committed
together, or neither is.

    dj migrate
    DATABASE_URL=postgresql+psycopg://localhost/app python examples/sync_app.py ada 4200
    DJ_TASKS=examples.sync_app dj work                    # runs send_invoice
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dj import job

engine = create_engine(os.environ.get("DATABASE_URL", "postgresql+psycopg://localhost/app"))


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(200))
    total_cents: Mapped[int]


@job(name="examples.send_invoice")
def send_invoice(order_id: int) -> str:
    with Session(engine) as session:
        order = session.get(Order, order_id)
        assert order is not None
        return f"invoice for order {order.id}: {order.total_cents / 100:.2f}"  # a real app mails it


def place_order(customer: str, total_cents: int) -> tuple[int, int]:
    """The order's id and its invoice job's id."""
    with Session(engine) as session, session.begin():  # commits at the end of the block
        order = Order(customer=customer, total_cents=total_cents)
        session.add(order)
        session.flush()  # the row's id, inside the transaction
        return order.id, send_invoice.using(conn=session).enqueue(order.id)


if __name__ == "__main__":
    Base.metadata.create_all(engine)
    order_id, job_id = place_order(sys.argv[1], int(sys.argv[2]))
    print(f"order {order_id}, invoice job {job_id}")
