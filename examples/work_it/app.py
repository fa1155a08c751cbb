"""work-it as an async web app on dj (Starlette, SQLAlchemy AsyncSession).

    DJ_DATABASE_URL=... uvicorn examples.work_it.app:app      # then open http://127.0.0.1:8000

A POST stores the thought and enqueues the mail job in the same transaction, then answers at once;
a worker (`dj work --queues mail`) sends the mail. With WORK_IT_INLINE=1 the request sends the mail
itself, giphy call and all, which is the slowness the tutorials start from.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
from collections.abc import AsyncIterator
from datetime import datetime

import psycopg
from sqlalchemy import DateTime, Text, UniqueConstraint, func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

import dj
from tasks.mail import send_randomness_email, validate_address

MAX_THOUGHT_CHARS = 2000


class Base(DeclarativeBase):
    pass


class Thought(Base):
    __tablename__ = "work_it_thoughts"
    __table_args__ = (UniqueConstraint("email", "body", name="work_it_thoughts_once"),)  # one mail per thought

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Work-It</title></head>
<body><h1>Work-It</h1><p>{message}</p>
<form method="post" action="/thoughts">
<label>Email <input name="email" type="email" required></label>
<label>A random thought <input name="thought" required></label>
<button>Send me a giphy</button></form></body></html>"""


def engine_for(url: str) -> AsyncEngine:
    """An async engine on psycopg 3 for a dj database URL (a URL or a key=value DSN alike)."""
    return create_async_engine("postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(url),
                               pool_size=10)


def create_app(database_url: str | None = None, inline: bool | None = None) -> Starlette:
    url = database_url or dj.database_url()
    inline = os.environ.get("WORK_IT_INLINE", "") in ("1", "true", "yes") if inline is None else inline
    engine = engine_for(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def form(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.format(message="Share a thought; we will mail you a giphy about it."))

    async def post_thought(request: Request) -> HTMLResponse:
        data = await request.form()
        email, thought = str(data.get("email", "")), str(data.get("thought", "")).strip()
        try:
            email = validate_address(email)
        except dj.DJError as exc:
            return HTMLResponse(PAGE.format(message=html.escape(str(exc))), status_code=400)
        if not thought or len(thought) > MAX_THOUGHT_CHARS:
            return HTMLResponse(PAGE.format(message=f"A thought is 1 to {MAX_THOUGHT_CHARS} characters."),
                                status_code=400)
        try:
            async with sessions.begin() as session:  # commits at the end of the block, rolls back on error
                session.add(Thought(email=email, body=thought))
                await session.flush()  # the row first: a thought already shared fails here, before any mail
                if not inline:
                    # In the same transaction as the row: no thought without its mail, nor a mail
                    # about a thought that was rolled back.
                    await send_randomness_email.using(conn=session).enqueue_async(email, thought)
        except IntegrityError:
            return HTMLResponse(PAGE.format(message="You shared that thought already."), status_code=409)
        if inline:
            await asyncio.to_thread(send_randomness_email, email, thought)  # the job's function, here
        return HTMLResponse(PAGE.format(message=f"Thanks! A giphy about {html.escape(thought)!s} is on its way."))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = Starlette(routes=[Route("/", form), Route("/thoughts", post_thought, methods=["POST"])], lifespan=lifespan)
    app.state.inline = inline
    return app


def __getattr__(name: str):  # `uvicorn examples.work_it.app:app`, built on first use
    if name == "app":
        return create_app()
    raise AttributeError(name)
