"""Where each of a worker's claims starts reading a queue: the position of its last claimed job,
or the head of the queue.

Why: while another session holds an old snapshot, every job drained since leaves an entry in the
claim index that no scan may mark dead, and a claim that starts at the head of the index visits
the heap for each of them. With a million jobs drained, each claim read a million entries: the
drain lost two thirds of its rate and an idle worker took 381 ms to pick up a new job. Starting
after the last claimed position skips them (sql.CLAIM has the figures).

Claim order stays as it is: a job can sit before a worker's position only if it was put there
after the worker passed that point, and then the worker goes back:
- an enqueue's NOTIFY says where its first job sits (sql._WAKE_AT); the worker moves back to just
  before it if that is before its position, else stays;
- any other NOTIFY on the queue (a reclaimed or retried job, a batch callback, a resumed queue)
  sends it to the head;
- a failure this worker recorded sends it to the head if the retry has a lower priority number
  than its position (a retry waits at least 5 s, so with the same priority it lands after it);
- and at least every PROBE_EVERY seconds a probe reads each queue from its head, for what no NOTIFY
  announces: jobs handed back by a stopping worker, rows another worker locked and let go, a
  scheduled job of a lower priority number that came due. It moves the worker back to just before
  the first ready job if that sits before its position.

The probe (sql.POLL from the head) runs on the maintenance thread's connection, not on the claim's:
a read from the head is slow exactly when it matters (an old snapshot: ~200 ms after a 1M-job
drain), and on the claim's connection it held up the pickup of any job enqueued meanwhile (p99
235-242 ms, where the goal is 50). Off that connection, claims from the position go on while it
runs. It stretches its interval to PROBE_COST_FACTOR x its last server time, so that it takes at
most a few percent of a server process. Should the probes stop (the maintenance connection is
down), the claims read from the head themselves again, on the old schedule: every RESCAN_EVERY
seconds, stretched likewise by the head claim's time.

Thread-safe: the listener thread calls `woken` (and, when it polls, `probed`), the maintenance
thread `probe_due` and `probed`, the main loop the rest.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .task import PRIORITY_MIN

SEPARATOR = "\x1f"
PROBE_EVERY = 1.0
PROBE_COST_FACTOR = 20.0
# Claims read from the head on a timer only while probes are this many intervals late.
PROBE_LATE_FACTOR = 3.0
RESCAN_EVERY = 1.0
RESCAN_COST_FACTOR = 20.0

Position = tuple[int, int, int]  # (priority, run_at in microseconds since the epoch, id)
HEAD = None


def parse_wake(payload: str) -> tuple[str, Position | None]:
    """An enqueue NOTIFY's payload: (queue, position of its first job), or (queue, None) for a
    payload that names only the queue."""
    parts = payload.rsplit(SEPARATOR, 3)
    if len(parts) == 4:
        try:
            return parts[0], (int(parts[1]), int(parts[2]), int(parts[3]))
        except ValueError:
            pass
    return payload, None


class ClaimCursors:
    def __init__(self, queues: list[str], min_priority: int = PRIORITY_MIN):
        self.queues = list(queues)
        self.min_priority = min_priority
        self._lock = threading.Lock()
        self._at: dict[str, Position | None] = dict.fromkeys(self.queues, HEAD)
        # Moves back that arrived since the last claim was sent: applied to the next one, so that
        # a claim in flight when a NOTIFY arrives cannot overwrite it with its own last row.
        self._back: dict[str, Position | None] = {}
        # Each queue's last claimed position, kept while a read from the head is under way: a read
        # from the head that finds no ready job in a queue puts the queue back there. (Nothing was
        # ready, so any position would do; this one keeps the next read short. Left at the head, an
        # idle queue's next job waited for a read from the head: ~200 ms under an old snapshot.)
        self._last: dict[str, Position] = {}
        self._sent_head: list[str] = []  # the queues the claim in flight reads from the head
        self._rescan_at = 0.0  # the next claim from the head on a timer (pushed on by each probe)
        self._rescan_every = RESCAN_EVERY
        self._probe_at = 0.0
        self._probe_seconds = 0.0  # the server's time of the last read from the head by a probe

    # --- the main loop ------------------------------------------------------------------------

    def params(self) -> tuple[dict[str, Any], bool]:
        """The claim's position parameters, and whether any queue is read from its head."""
        now = time.monotonic()
        with self._lock:
            if now >= self._rescan_at:
                self._back = dict.fromkeys(self.queues, HEAD)
            for q, pos in self._back.items():
                cur = self._at.get(q, HEAD)
                self._at[q] = HEAD if pos is HEAD or cur is HEAD else min(cur, pos)
            self._back = {}
            at = [self._at.get(q, HEAD) for q in self.queues]
            self._sent_head = [q for q, p in zip(self.queues, at) if p is HEAD]
        head = bool(self._sent_head)
        return {
            "after_priority": [self.min_priority if p is HEAD else p[0] for p in at],
            "after_micros": [None if p is HEAD else p[1] for p in at],
            "after_id": [None if p is HEAD else p[2] for p in at],
        }, head

    def claimed(self, last: dict[str, Position], head: bool, seconds: float) -> None:
        """After a claim: `last` is the last claimed position per queue (queues with no row left
        out); `head` and `seconds` say whether the claim read from a head and how long it took."""
        with self._lock:
            self._at.update(last)
            self._last.update(last)
            for q in self._sent_head:
                if q not in last and q in self._last and self._at.get(q, HEAD) is HEAD:
                    self._at[q] = self._last[q]
            self._sent_head = []
            if head:
                self._rescan_every = max(RESCAN_EVERY, RESCAN_COST_FACTOR * seconds)
                # Not sooner than the probes have pushed it: while they run, no timer is needed.
                self._rescan_at = max(self._rescan_at, time.monotonic() + self._rescan_every)

    def positions(self) -> dict[str, Any]:
        """The positions the next claim would start from, as CLAIM's (and POLL's) parameters,
        without consuming the moves back waiting for it (the notifier's positioned poll)."""
        with self._lock:
            at: list[Position | None] = []
            for q in self.queues:
                cur = self._at.get(q, HEAD)
                if q in self._back:
                    pos = self._back[q]
                    cur = HEAD if cur is HEAD or pos is HEAD else min(cur, pos)
                at.append(cur)
        return {
            "after_priority": [self.min_priority if p is HEAD else p[0] for p in at],
            "after_micros": [None if p is HEAD else p[1] for p in at],
            "after_id": [None if p is HEAD else p[2] for p in at],
        }

    def head(self) -> dict[str, Any]:
        """Every queue's head as CLAIM's (and POLL's) position parameters."""
        n = len(self.queues)
        return {"after_priority": [self.min_priority] * n, "after_micros": [None] * n, "after_id": [None] * n}

    def failed(self, queue: str, priority: int) -> None:
        """This worker recorded a failure whose retry waits in `queue` with `priority`."""
        with self._lock:
            cur = self._at.get(queue, HEAD)
            if cur is not HEAD and priority < cur[0]:
                self._back[queue] = HEAD

    def rescan(self) -> None:
        """Read every queue from its head at the next claim (a poll ran out, a reconnect)."""
        with self._lock:
            self._back = dict.fromkeys(self.queues, HEAD)

    # --- the probe (the maintenance thread) ---------------------------------------------------

    def probe_due(self) -> bool:
        return time.monotonic() >= self._probe_at

    def head_is_cheap(self, cheap: float) -> bool:
        """Whether the last probe took the server at most `cheap` seconds (no old snapshot about)."""
        return self._probe_seconds <= cheap

    def probed(self, first: dict[str, Position], seconds: float) -> bool:
        """A probe read each queue from its head: `first` is the position of the first ready job of
        each queue that has one, `seconds` the server's time. Moves a queue back to just before its
        first ready job if that is before the queue's position; returns whether any queue has a
        ready job (the main loop should claim)."""
        now = time.monotonic()
        with self._lock:
            self._probe_seconds = seconds
            every = max(PROBE_EVERY, PROBE_COST_FACTOR * seconds)
            self._probe_at = now + every
            self._rescan_at = max(self._rescan_at, now + max(PROBE_LATE_FACTOR * every, self._rescan_every))
            for queue, pos in first.items():
                if queue not in self._at:
                    continue
                pending = self._back.get(queue, ())
                if pending is HEAD:
                    continue
                before = (pos[0], pos[1], pos[2] - 1)
                self._back[queue] = min(pending, before) if pending else before
        return bool(first)

    # --- the listener -------------------------------------------------------------------------

    def woken(self, payload: str) -> bool:
        """A NOTIFY on the jobs channel; returns whether it is for one of this worker's queues."""
        if payload in self._at:  # the queue alone (also a queue whose name looks like a position)
            queue, pos = payload, None
        else:
            queue, pos = parse_wake(payload)
            if queue not in self._at:
                return False
        with self._lock:
            pending = self._back.get(queue, ())
            if pos is None or pending is HEAD:
                self._back[queue] = HEAD
            else:
                # Just before the new job: the claim reads rows after the position it is given.
                # Compared with the position when the next claim is sent (params), since a claim
                # in flight now may move it past the new job.
                before = (pos[0], pos[1], pos[2] - 1)
                self._back[queue] = min(pending, before) if pending else before
        return True
