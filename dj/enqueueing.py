"""Writing jobs, once for sync and async callers.

What an enqueue of several jobs (or one with a unique key) does is plain Python: `Plan.steps()`
is a generator that yields each statement to run and is sent back its rows. Two short drivers
run those steps, `run()` on a psycopg Connection and `run_async()` on an AsyncConnection, so the
statement choice, the unique-key retries, the COPY path and the matching of returned ids to input
rows are written once. (A single job without a key has a shorter path in dj/task.py.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg

from . import sql, tracing
from .batches import Batch, current_batch
from .dependencies import UnknownDependency

if TYPE_CHECKING:
    from .task import Options

# From this many rows (without unique keys) an enqueue uses COPY instead of one INSERT.
COPY_AT = 1000
# Arguments travel in every claim and sit in the hot table: pass references (ids, paths), not data.
MAX_ARGS_BYTES = 1_000_000

Call = tuple[Sequence[Any], dict[str, Any]]
Row = tuple[str, str, "str | None", "str | None"]  # args JSON, kwargs JSON, unique key, limit key


# A NUL character, as JSON escapes it: an even run of backslashes (escaped backslashes), then \u0000.
_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _check_nul(args_json: str, kwargs_json: str) -> None:
    # PostgreSQL's jsonb cannot hold "\u0000" (it would raise UntranslatableCharacter at the
    # INSERT); refused here, before any I/O, so the test mode (dj.testing) refuses it alike.
    for text in (args_json, kwargs_json):
        if "\\u0000" in text and _NUL.search(text):  # the substring test keeps the common case cheap
            raise ValueError("job arguments contain a NUL character (\\x00), which PostgreSQL's jsonb cannot "
                             "store: strip it, or pass binary data base64-encoded")


def _check_size(args_json: str, kwargs_json: str) -> None:
    size = len(args_json) + len(kwargs_json)  # json.dumps escapes to ASCII: characters are bytes
    if size > MAX_ARGS_BYTES:
        raise ValueError(f"job arguments are {size / 1e6:.1f} MB of JSON; the limit is "
                         f"{MAX_ARGS_BYTES / 1e6:g} MB: pass a reference (an id, a path) instead")


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def to_json(value: Any, what: str) -> str:
    if not value and isinstance(value, (list, tuple, dict)):
        return "{}" if isinstance(value, dict) else "[]"
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"job {what} must be JSON-serialisable: {exc}") from None


def arguments_json(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[str, str]:
    """A job's args and kwargs as JSON, within the size limit."""
    args_json, kwargs_json = to_json(args, "args"), to_json(kwargs, "kwargs")
    _check_size(args_json, kwargs_json)
    _check_nul(args_json, kwargs_json)
    return args_json, kwargs_json


def key_from_args(options: Options, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    if options.unique_key is not None:
        key = options.unique_key
    elif options.unique is True:
        key = to_json([list(args), kwargs], "args")
    elif callable(options.unique):
        key = str(options.unique(*args, **kwargs))
    else:
        return None
    return f"{name}:{key}"


def limit_key_from_args(options: Options, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """The job's per-key limit key, "task:key" (so two tasks never share a key's limit), or None."""
    if options.limit_by is None:
        return None
    return f"{name}:{options.limit_by(*args, **kwargs)}"


def row_params(name: str, options: Options, args_json: str, kwargs_json: str, key: str | None,
               batch_id: int | None, limit_key: str | None = None) -> dict[str, Any]:
    """The parameters of ENQUEUE_ONE and ENQUEUE_ONE_UNIQUE."""
    o = options
    return {"queue": o.queue, "priority": o.priority, "task": name, "args": args_json, "kwargs": kwargs_json,
            "run_at": o.run_at, "max_attempts": o.max_attempts, "timeout": o.timeout, "unique_key": key,
            "batch_id": batch_id, "limit_key": limit_key, "key_limit": o.limit if limit_key is not None else None,
            "trace_context": tracing.carrier() if tracing.ENABLED else None, "keep": o.keep}


class Execute(NamedTuple):
    """Run a statement; the driver sends back all its rows."""
    statement: str
    params: Any


class Copy(NamedTuple):
    """COPY rows in; the driver sends back None."""
    statement: str
    rows: Iterable[tuple[Any, ...]]


# What a step generator yields, is sent back (rows, or None after a COPY) and returns.
Steps = Generator["Execute | Copy", "list[Any] | None", list[int]]
Inserting = Generator["Execute | Copy", "list[Any] | None", "list[int | None]"]


class Plan:
    """The jobs of one enqueue call, encoded and checked before any I/O (so bad arguments write
    nothing), and the statements that insert them."""

    def __init__(self, name: str, options: Options, calls: list[Call]):
        self.name = name
        self.options = options
        self.rows: list[Row] = [(*arguments_json(args, kwargs), key_from_args(options, name, args, kwargs),
                                 limit_key_from_args(options, name, args, kwargs))
                                for args, kwargs in calls]
        self.batch: Batch | None = current_batch()
        # COPY draws ids, copies and notifies in three statements, which must be one transaction.
        self.copy = (len(self.rows) >= COPY_AT and not options.after
                     and all(key is None for _, _, key, _ in self.rows))
        self.trace_context = tracing.carrier() if tracing.ENABLED else None

    def steps(self) -> Steps:
        rows, batch = self.rows, self.batch
        ids: dict[int, int] = {}
        pending = list(range(len(rows)))
        # A key's holder can finish between our INSERT and the look-up of its id; then the key
        # is free, and the next round inserts the job after all.
        while pending:
            inserted = yield from self._insert([rows[i] for i in pending])
            if batch:
                batch.total += sum(1 for job_id in inserted if job_id is not None)
            held = {}
            for i, job_id in zip(pending, inserted):
                if job_id is None:
                    held[rows[i][2]] = i
                else:
                    ids[i] = job_id
            holders = dict((yield Execute(sql.HOLDERS_OF_KEYS, (list(held),))) or ()) if held else {}
            for key, i in held.items():
                if key in holders:
                    ids[i] = holders[key]
            pending = [i for key, i in held.items() if key not in holders]
        return [ids[i] for i in range(len(rows))]

    def _insert(self, rows: list[Row]) -> Inserting:
        """Insert rows (and NOTIFY). Returns each row's new id, or None where its unique key was held."""
        o = self.options
        batch_id = self.batch.id if self.batch else None
        if self.copy:
            return (yield from self._copy(rows, batch_id))
        if o.after:
            return (yield from self._insert_after(rows, batch_id))
        if len(rows) == 1:
            # A keyed job takes the statement with every column; ENQUEUE_ONE has the common ones.
            statement = sql.ENQUEUE_ONE if rows[0][2] is None and rows[0][3] is None else sql.ENQUEUE_ONE_UNIQUE
            args_json, kwargs_json, key, limit_key = rows[0]
            found = yield Execute(statement, row_params(self.name, o, args_json, kwargs_json, key, batch_id, limit_key))
            return [found[0][0] if found else None]
        returned_rows = yield Execute(sql.ENQUEUE, {**self._many_params(rows, batch_id), "run_at": o.run_at})
        return _line_up(rows, [(job_id, key) for job_id, key, _ in returned_rows or ()])

    def _many_params(self, rows: list[Row], batch_id: int | None) -> dict[str, Any]:
        """The parameters ENQUEUE and ENQUEUE_AFTER share: one builder, so that a column added to
        one cannot be forgotten in the other (ENQUEUE_AFTER once lost `keep` that way)."""
        o = self.options
        return {"queue": o.queue, "priority": o.priority, "task": self.name, "max_attempts": o.max_attempts,
                "timeout": o.timeout, "batch_id": batch_id, "trace_context": self.trace_context, "keep": o.keep,
                "args": [r[0] for r in rows], "kwargs": [r[1] for r in rows], "keys": [r[2] for r in rows],
                "limit_keys": [r[3] for r in rows], "key_limit": o.limit if o.limit_by is not None else None}

    def _insert_after(self, rows: list[Row], batch_id: int | None) -> Inserting:
        """Insert rows that wait for other jobs or batches (ENQUEUE_AFTER; dj/dependencies.py)."""
        after = self.options.after
        assert after is not None
        params = {**self._many_params(rows, batch_id), "after_jobs": list(after[0]), "after_batches": list(after[1])}
        returned_rows = yield Execute(sql.ENQUEUE_AFTER, params)
        for job_id, _, _, unknown in returned_rows or ():
            if job_id is None:
                raise UnknownDependency(f"after= names no such {unknown}: it never existed")
        return _line_up(rows, [(job_id, key) for job_id, key, _, _ in returned_rows or ()])

    def _copy(self, rows: list[Row], batch_id: int | None) -> Inserting:
        """Bulk path: draw the ids first, then COPY the rows in, then one NOTIFY.

        COPY cannot return ids, so they come from the table's sequence beforehand. Columns left at
        their defaults (run_at = now(), no timeout, no batch, no trace context, not kept) are left out
        of the COPY."""
        o = self.options
        ids: list[int | None] = [r[0] for r in (yield Execute(sql.DRAW_JOB_IDS, (len(rows),))) or ()]
        fixed = {"queue": o.queue, "priority": o.priority, "task": self.name, "max_attempts": o.max_attempts,
                 "run_at": o.run_at, "timeout": o.timeout, "batch_id": batch_id,
                 "trace_context": self.trace_context, "key_limit": o.limit if o.limit_by is not None else None,
                 "keep": o.keep}
        fixed = {k: v for k, v in fixed.items() if v is not None}
        tail = tuple(fixed.values())
        if o.limit_by is None:
            yield Copy(f"COPY jobs ({', '.join(['id', 'args', 'kwargs', *fixed])}) FROM STDIN",
                       ((job_id, args, kwargs, *tail) for job_id, (args, kwargs, _, _) in zip(ids, rows)))
        else:
            yield Copy(f"COPY jobs ({', '.join(['id', 'args', 'kwargs', 'limit_key', *fixed])}) FROM STDIN",
                       ((job_id, args, kwargs, limit_key, *tail)
                        for job_id, (args, kwargs, _, limit_key) in zip(ids, rows)))
        yield Execute(sql.NOTIFY_COPY, {"id": ids[0] if ids else None, "queue": o.queue})
        return ids


def _line_up(rows: list[Row], returned_rows: list[tuple[int, str | None]]) -> list[int | None]:
    """Each input row's new id, or None where its unique key was held. Identity values are drawn
    in input order, so the inserted rows, sorted by id, line up with the rows not skipped."""
    returned = iter(sorted(returned_rows))
    nxt = next(returned, None)
    result: list[int | None] = []
    for _, _, key, _ in rows:
        if nxt is not None and nxt[1] == key:
            result.append(nxt[0])
            nxt = next(returned, None)
        else:
            result.append(None)
    return result


# The drivers. On dj's own (autocommit) connection a COPY gets a transaction of its own; a
# caller's connection is left to the caller's transaction, as with every enqueue.

def run(conn: psycopg.Connection[Any], plan: Plan) -> list[int]:
    with conn.transaction() if plan.copy and conn.autocommit else nullcontext():
        steps, reply = plan.steps(), None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Copy):
                with conn.cursor().copy(step.statement) as copy:
                    for row in step.rows:
                        copy.write_row(row)
                reply = None
            else:
                reply = conn.execute(step.statement, step.params).fetchall()


async def run_async(conn: psycopg.AsyncConnection[Any], plan: Plan) -> list[int]:
    async with conn.transaction() if plan.copy and conn.autocommit else nullcontext():
        steps, reply = plan.steps(), None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Copy):
                async with conn.cursor().copy(step.statement) as copy:
                    for row in step.rows:
                        await copy.write_row(row)
                reply = None
            else:
                reply = await (await conn.execute(step.statement, step.params)).fetchall()
