"""The same tasks, called as their signatures say: a type checker (mypy --strict) finds nothing."""

import psycopg
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import dj
from dj import Task
from typed_tasks import create_user, send_welcome


def app(session: Session, conn: psycopg.Connection) -> list[int]:
    task: Task[[int], None] = create_user
    create_user(2)
    with dj.batch(conn=session):
        first: int = task.enqueue(1)
    return [first, create_user.using(queue="q", conn=session).enqueue(marker=3),
            *create_user.using(conn=conn).enqueue_many([(4,), {"marker": 5}])]


async def main(session: AsyncSession) -> list[int]:
    await send_welcome("a@b.c", lang="fr")
    one = await send_welcome.using(priority=1, conn=session).enqueue_async("a@b.c", lang="fr")
    return [one, *await create_user.enqueue_many_async([(1,)])]
