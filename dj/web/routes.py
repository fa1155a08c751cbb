"""The dashboard's pages, fragments and actions.

Pages are plain server-rendered HTML; htmx only refreshes the live parts (queue counts, workers,
the chart) by polling fragment URLs. Every action is an ordinary POST form that redirects back
(303), so everything works without JavaScript too. Reads and writes go through dj.admin.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, unquote, urlencode

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import admin, history
from ..errors import DJError
from . import chart, queries
from .security import SESSION_COOKIE, SESSION_SECONDS, safe_next

PAGE_SIZE = 50
FLASH_COOKIE = "dj_flash"


# --- helpers --------------------------------------------------------------------------------------

def _conn(request: Request):
    return request.app.state.connection()


def _render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    flash = _read_flash(request)
    html = request.app.state.templates.get_template(template).render(
        request=request, csrf=request.state.csrf, token_required=request.state.token_required,
        flash=flash, path=request.url.path, **context)
    response = HTMLResponse(html, status)
    if flash and not template.startswith("_"):
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def _read_flash(request: Request) -> tuple[str, str] | None:
    raw = unquote(request.cookies.get(FLASH_COOKIE, ""))
    if ":" not in raw:
        return None
    kind, _, text = raw.partition(":")
    return (kind if kind in ("ok", "error") else "error"), text[:500]


def _back(request: Request, default: str, kind: str, message: str) -> RedirectResponse:
    response = RedirectResponse(safe_next(request.state.form.get("next"), default), 303)
    response.set_cookie(FLASH_COOKIE, quote(f"{kind}:{message}"), max_age=60, path="/", httponly=True,
                        samesite="strict")
    return response


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "").strip()
    return int(value) if value.isdigit() and len(value) < 19 else None


# --- pages ----------------------------------------------------------------------------------------

def overview(request: Request) -> HTMLResponse:
    with _conn(request) as conn:
        doc = queries.overview(conn)
        series = queries.per_minute(conn)
    return _render(request, "overview.html", doc=doc, chart=chart.chart(series), title="Overview")


def overview_fragment(request: Request) -> HTMLResponse:
    with _conn(request) as conn:
        doc = queries.overview(conn)
    return _render(request, "_queues.html", doc=doc)


def chart_fragment(request: Request) -> HTMLResponse:
    with _conn(request) as conn:
        series = queries.per_minute(conn)
    return _render(request, "_chart.html", chart=chart.chart(series))


def jobs(request: Request) -> Response:
    params = request.query_params
    state = params.get("state") or None
    queue = params.get("queue") or None
    task = params.get("task") or None
    notice = None
    if state is not None and state not in admin.STATES:
        notice = f"unknown state {state!r}; showing every state"
        state = None
    search = params.get("id", "").strip()
    with _conn(request) as conn:
        if search:
            if search.lstrip("#").isdigit() and len(search) < 19:
                job_id = int(search.lstrip("#"))
                try:
                    admin.get_job(conn, job_id)
                    return RedirectResponse(f"/jobs/{job_id}", 303)
                except DJError as exc:
                    notice = str(exc)
            else:
                notice = f"{search!r} is not a job id"
        after, before = _int_param(request, "after"), _int_param(request, "before")
        rows = admin.list_jobs(conn, state=state, queue=queue, limit=PAGE_SIZE + 1, task=task,
                               after_id=after, before_id=None if after is not None else before)
        queue_names = [q["name"] for q in queries.overview(conn)["queues"]]
    backwards = before is not None and after is None
    more = len(rows) > PAGE_SIZE
    if more:
        rows = rows[1:] if backwards else rows[:PAGE_SIZE]
    filters = {k: v for k, v in (("state", state), ("queue", queue), ("task", task)) if v}
    base = "/jobs?" + urlencode(filters) + ("&" if filters else "")
    paging = {
        "first": "/jobs?" + urlencode(filters) if (after is not None or before is not None) else None,
        "previous": base + f"before={rows[0]['id']}" if rows and ((backwards and more) or after is not None)
        else None,
        "next": base + f"after={rows[-1]['id']}" if rows and (backwards or more) else None,
    }
    return _render(request, "jobs.html", rows=rows, filters=filters, state=state, queue=queue, task=task,
                   states=admin.STATES, queue_names=queue_names, paging=paging, notice=notice, search=search,
                   title="Jobs", now=datetime.now(timezone.utc))


def history_page(request: Request) -> HTMLResponse:
    """Kept successes (jobs enqueued with keep=), newest first, searchable by task and queue."""
    params = request.query_params
    queue = params.get("queue") or None
    task = (params.get("task") or "").strip() or None
    before = _int_param(request, "before")
    with _conn(request) as conn:
        # Newest first: page backwards from the end (or from `before`), PAGE_SIZE + 1 to see if more.
        rows = history.list_results(conn, queue, f"%{task}%" if task else None, PAGE_SIZE + 1,
                                    before_id=before if before is not None else 2**63 - 1)
        queue_names = sorted(history.counts(conn)[0])
    rows.reverse()
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    filters = {k: v for k, v in (("queue", queue), ("task", task)) if v}
    base = "/history?" + urlencode(filters) + ("&" if filters else "")
    paging = {"first": "/history?" + urlencode(filters) if before is not None else None, "previous": None,
              "next": base + f"before={rows[-1]['id']}" if rows and more else None}
    return _render(request, "history.html", rows=rows, filters=filters, queue=queue, task=task,
                   queue_names=queue_names, paging=paging, title="History", now=datetime.now(timezone.utc),
                   pretty=_pretty)


def job_page(request: Request) -> HTMLResponse:
    job_id = request.path_params["job_id"]
    with _conn(request) as conn:
        try:
            job = admin.get_job(conn, job_id)
        except DJError as exc:
            return _render(request, "missing.html", 404, message=str(exc), title=f"Job {job_id}")
    return _render(request, "job.html", job=job, title=f"Job {job_id}", now=datetime.now(timezone.utc),
                   args_json=_pretty(job["args"]), kwargs_json=_pretty(job["kwargs"]),
                   result_json=_pretty(job["result"]) if job.get("state") == "succeeded" else None)


def _pretty(value: Any) -> str:
    """JSON on one line when it is short, indented when it is not."""
    flat = json.dumps(value, ensure_ascii=False)
    return flat if len(flat) <= 100 else json.dumps(value, indent=2, ensure_ascii=False)


def workers(request: Request) -> HTMLResponse:
    with _conn(request) as conn:
        rows = queries.workers(conn)
    return _render(request, "workers.html", workers=rows, stale_after=queries.STALE_AFTER_S, title="Workers")


def workers_fragment(request: Request) -> HTMLResponse:
    with _conn(request) as conn:
        rows = queries.workers(conn)
    return _render(request, "_workers.html", workers=rows, stale_after=queries.STALE_AFTER_S)


def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


# --- actions --------------------------------------------------------------------------------------

def _job_action(request: Request, action, done: str, then: str = "/jobs/{id}") -> RedirectResponse:
    job_id = request.path_params["job_id"]
    try:
        with _conn(request) as conn:
            action(conn, job_id)
    except DJError as exc:
        return _back(request, f"/jobs/{job_id}", "error", str(exc))
    return _back(request, then.format(id=job_id), "ok", done.format(id=job_id))


def retry_job(request: Request) -> RedirectResponse:
    return _job_action(request, admin.retry, "job {id} is ready to run again, with fresh attempts")


def run_now(request: Request) -> RedirectResponse:
    return _job_action(request, admin.retry, "job {id} runs now")


def cancel_job(request: Request) -> RedirectResponse:
    # Its page is gone afterwards, so a form on it should not send `next` back there.
    return _job_action(request, admin.cancel, "job {id} cancelled (deleted)", then="/jobs")


def _queue_action(request: Request, action) -> RedirectResponse:
    queue = request.state.form.get("queue", "")
    if not queue:
        return _back(request, "/", "error", "no queue given")
    try:
        with _conn(request) as conn:
            message = action(conn, queue)
    except DJError as exc:
        return _back(request, "/", "error", str(exc))
    return _back(request, "/", "ok", message)


def retry_dead(request: Request) -> RedirectResponse:
    return _queue_action(request, lambda conn, q: f"{admin.retry_dead(conn, q)} dead job(s) of {q} are ready again")


def pause(request: Request) -> RedirectResponse:
    def act(conn, q):
        admin.pause_queue(conn, q)
        return f"queue {q} is paused: workers take none of its jobs until it is resumed"
    return _queue_action(request, act)


def resume(request: Request) -> RedirectResponse:
    def act(conn, q):
        admin.resume_queue(conn, q)
        return f"queue {q} is active again"
    return _queue_action(request, act)


# --- login ----------------------------------------------------------------------------------------

def login_page(request: Request) -> Response:
    if not request.state.token_required:
        return RedirectResponse("/", 303)
    return _render(request, "login.html", next=safe_next(request.query_params.get("next")), error=None,
                   title="Log in")


def login(request: Request) -> Response:
    form = request.state.form
    target = safe_next(form.get("next"))
    if not request.state.token_required:
        return RedirectResponse(target, 303)
    if not request.app.state.secrets.token_ok(form.get("token", "")):
        time.sleep(0.3)  # slows down guessing (this runs on a worker thread, not the event loop)
        return _render(request, "login.html", 401, next=target, error="wrong token", title="Log in")
    response = RedirectResponse(target, 303)
    response.set_cookie(SESSION_COOKIE, request.app.state.secrets.new_session(), max_age=SESSION_SECONDS,
                        path="/", httponly=True, samesite="lax", secure=request.url.scheme == "https")
    return response


def logout(request: Request) -> Response:
    response = RedirectResponse("/login" if request.state.token_required else "/", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


ROUTES = [
    Route("/", overview),
    Route("/fragments/queues", overview_fragment),
    Route("/fragments/chart", chart_fragment),
    Route("/fragments/workers", workers_fragment),
    Route("/jobs", jobs),
    Route("/jobs/{job_id:int}", job_page),
    Route("/history", history_page),
    Route("/jobs/{job_id:int}/retry", retry_job, methods=["POST"]),
    Route("/jobs/{job_id:int}/run-now", run_now, methods=["POST"]),
    Route("/jobs/{job_id:int}/cancel", cancel_job, methods=["POST"]),
    Route("/queues/retry-dead", retry_dead, methods=["POST"]),
    Route("/queues/pause", pause, methods=["POST"]),
    Route("/queues/resume", resume, methods=["POST"]),
    Route("/workers", workers),
    Route("/metrics", metrics),
    Route("/login", login_page, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/logout", logout, methods=["POST"]),
]
