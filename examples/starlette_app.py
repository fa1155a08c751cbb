"""dj from an async web app: Starlette and a SQLAlchemy AsyncSession.

POST /signup {"email": ...} inserts a signup row and enqueues its welcome mail in the same
transaction: both are committed together, or neither is (a second signup with the same email
fails on the unique constraint, rolls back, and leaves no job). Workers are woken at the commit.

    dj migrate                                            # dj's tables, once
    DATABASE_URL=postgresql+psycopg://localhost/app uvicorn examples.starlette_app:app
    DJ_TASKS=examples.starlette_app dj work               # runs send_welcome
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dj import job

# The psycopg 3 driver (postgresql+psycopg): dj writes through the session's own connection.
engine = create_async_engine(os.environ.get("DATABASE_URL", "postgresql+psycopg://localhost/app"))
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Signup(Base):
    __tablename__ = "example_signups"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)


@job(name="examples.send_welcome", queue="mail")
async def send_welcome(signup_id: int) -> str:
    async with Session() as session:
        signup = await session.get(Signup, signup_id)
        assert signup is not None  # the job was committed with the row
        return f"welcome, {signup.email}"  # a real app sends the mail here


async def create_signup(request: Request) -> JSONResponse:
    email = (await request.json())["email"]
    try:
        async with Session() as session, session.begin():  # commits at the end of the block
            signup = Signup(email=email)
            session.add(signup)
            await session.flush()  # the row's id, inside the transaction
            job_id = await send_welcome.using(conn=session).enqueue_async(signup.id)
    except IntegrityError:  # rolled back: no row, and no job
        return JSONResponse({"error": f"{email} has already signed up"}, status_code=409)
    return JSONResponse({"id": signup.id, "job": job_id}, status_code=201)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = Starlette(routes=[Route("/signup", create_signup, methods=["POST"])], lifespan=lifespan)
