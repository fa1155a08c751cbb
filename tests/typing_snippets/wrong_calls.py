"""Calls a type checker must refuse: each line marked `# error: CODE` (mypy's error code)."""

from typed_tasks import create_user, send_welcome


create_user.enqueue("x")  # error: arg-type
create_user.using(queue="q").enqueue("x")  # error: arg-type
create_user.enqueue(1, 2)  # error: call-arg
create_user.using(queu="typo")  # error: call-arg
created: str = create_user.enqueue(1)  # error: assignment
create_user("x")  # error: arg-type


async def main() -> None:
    await create_user.enqueue_async("x")  # error: arg-type
    await send_welcome.using(priority=1).enqueue_async("a@b.c", lang=2)  # error: arg-type
    await send_welcome.enqueue_async()  # error: call-arg
