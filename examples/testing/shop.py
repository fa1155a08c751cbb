"""The code under test in README's "Testing your jobs" (tests/test_pytest_plugin.py runs its tests)."""

from datetime import datetime, timedelta, timezone

from dj import job

SENT: list[tuple[int, str]] = []  # stands in for a mail server


@job(name="shop.send_receipt", queue="mail")
def send_receipt(order_id: int, email: str) -> None:
    SENT.append((order_id, email))


@job(name="shop.ask_for_review")
def ask_for_review(order_id: int) -> None: ...


@job(name="shop.place_order")
def place_order(order_id: int, email: str) -> None:
    send_receipt.enqueue(order_id, email)
    ask_for_review.using(run_at=datetime.now(timezone.utc) + timedelta(days=3)).enqueue(order_id)


def checkout(order_id: int, email: str) -> None:
    """A web request's handler, say: it enqueues and returns."""
    place_order.enqueue(order_id, email)
