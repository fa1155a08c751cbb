"""The throughput chart's geometry: stacked bars (succeeded below, failed above) per minute.

Only numbers come out of here; the template draws them as inline SVG.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 22


@dataclass
class Bar:
    x: float
    width: float
    ok_y: float
    ok_h: float
    fail_y: float
    fail_h: float
    label: str


def nice_ceiling(n: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least n (and at least 1)."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if step * m >= n:
                return step * m
        step *= 10


def chart(series: list[tuple[int, int]], now: datetime | None = None) -> dict:
    now = (now or datetime.now(timezone.utc)).replace(second=0, microsecond=0)
    top = nice_ceiling(max((s + f for s, f in series), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(series), 1)
    bars = []
    for i, (ok, failed) in enumerate(series):
        ok_h = plot_h * ok / top
        fail_h = plot_h * failed / top
        base = TOP + plot_h
        minute = now - timedelta(minutes=len(series) - 1 - i)
        bars.append(Bar(x=round(LEFT + i * slot + 1, 2), width=round(max(slot - 2, 1), 2),
                        ok_y=round(base - ok_h, 2), ok_h=round(ok_h, 2),
                        fail_y=round(base - ok_h - fail_h, 2), fail_h=round(fail_h, 2),
                        label=f"{minute:%H:%M} UTC: {ok} succeeded, {failed} failed"))
    return {
        "width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT, "top": TOP,
        "base": TOP + plot_h, "mid": TOP + plot_h / 2, "max": top, "half": top / 2, "bars": bars,
        "succeeded": sum(s for s, _ in series), "failed": sum(f for _, f in series),
        "ticks": [(LEFT, "-60 min"), (LEFT + plot_w / 2, "-30 min"), (WIDTH - RIGHT, "now")],
    }
