"""Every statement the hot path runs: enqueue, claim, complete, fail, release, heartbeat, reap.

The statements are written out in full so the whole protocol can be read in one place. psycopg
prepares each of them after a few executions (except large flushes of COMPLETE and FAIL, whose
generic plan is quadratic: see `dj.worker.producer._prepare`), and every one that touches many jobs takes
arrays, so a batch of N jobs costs one round trip.

Rows are always found through the primary key (`id = ANY(...)`): joining a few hundred ids
against the table otherwise tempts the planner into a sequential scan of the whole backlog.

Fencing: a worker names itself in `locked_by`, and each claim bumps `attempts`. Every statement
that ends an attempt matches on (id, attempts, locked_by), so a worker that stalled and lost its
claim changes nothing when it wakes up: the row is either gone, unlocked, or locked by someone else
with a higher attempt number.
"""

NOTIFY_CHANNEL = "dj_jobs"
QUEUE_SETTINGS_CHANNEL = "dj_queue_settings"  # payload {"queue": ..., "paused": ...} (dj/admin.py)
RESULTS_CHANNEL = "dj_results"  # payload job ids, comma-separated: kept (succeeded) or died (dj/results.py)

# --- enqueue -------------------------------------------------------------------------------------

# The payload of an enqueue's NOTIFY: the queue, and where the first new job sits in claim order,
# "queue<US>priority<US>run_at in microseconds since the epoch<US>id" (US = the unit separator,
# chr(31)). A worker reads its queues from a remembered position instead of the index's head (see
# CLAIM); with this it moves back only when the new job sits before that position. Other NOTIFYs
# carry the queue alone, which sends workers back to the head. Parsed by dj.cursors.parse_wake.
_WAKE_AT = ("{queue} || chr(31) || {priority} || chr(31) || (extract(epoch FROM {run_at}) * 1000000)::int8"
            " || chr(31) || {id}")


# The enqueues write trace_context: the OpenTelemetry span context of the enqueue (dj/tracing.py),
# NULL without one, which a row stores in its null bitmap alone.
#
# One job, the common case: a plain VALUES insert, with its NOTIFY riding on RETURNING so that
# it is sent at commit. Measured: about 90% of a bare INSERT's rate, where ENQUEUE below with one
# row reaches 68%. A job without a unique key cannot conflict, so this leaves out ON CONFLICT and
# the speculative insertion PostgreSQL makes for it (4 of the 95 us the server spends).
ENQUEUE_ONE = """
INSERT INTO jobs (queue, priority, task, args, kwargs, run_at, max_attempts, timeout, batch_id, trace_context, keep)
VALUES (%(queue)s, %(priority)s, %(task)s, %(args)s::jsonb, %(kwargs)s::jsonb, coalesce(%(run_at)s, now()),
        %(max_attempts)s, %(timeout)s, %(batch_id)s, %(trace_context)s::jsonb, %(keep)s)
RETURNING id, pg_notify('""" + NOTIFY_CHANNEL + """', """ + _WAKE_AT.format(queue="%(queue)s", priority="priority", run_at="run_at", id="id") + """)
"""

# One job with a unique key, or a per-key limit (whose jobs all come this way, so that ENQUEUE_ONE
# stays as short as it is): skipped (no row, so no NOTIFY) while a live job holds the unique key.
ENQUEUE_ONE_UNIQUE = """
INSERT INTO jobs (queue, priority, task, args, kwargs, run_at, max_attempts, timeout, unique_key, batch_id,
                  limit_key, key_limit, trace_context, keep)
VALUES (%(queue)s, %(priority)s, %(task)s, %(args)s::jsonb, %(kwargs)s::jsonb, coalesce(%(run_at)s, now()),
        %(max_attempts)s, %(timeout)s, %(unique_key)s, %(batch_id)s, %(limit_key)s, %(key_limit)s,
        %(trace_context)s::jsonb, %(keep)s)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND failed_at IS NULL DO NOTHING
RETURNING id, pg_notify('""" + NOTIFY_CHANNEL + """', """ + _WAKE_AT.format(queue="%(queue)s", priority="priority", run_at="run_at", id="id") + """)
"""

# Many jobs in one statement, so one round trip, with one NOTIFY: sent once, at commit, and only
# if a row went in. Rows whose unique key is held by a live job are skipped.
ENQUEUE = """
WITH inserted AS (
    INSERT INTO jobs (queue, priority, task, args, kwargs, run_at, max_attempts, timeout, unique_key, batch_id,
                      limit_key, key_limit, trace_context, keep)
    SELECT %(queue)s, %(priority)s, %(task)s, t.args::jsonb, t.kwargs::jsonb, coalesce(%(run_at)s, now()),
           %(max_attempts)s, %(timeout)s, t.unique_key, %(batch_id)s, t.limit_key, %(key_limit)s,
           %(trace_context)s::jsonb, %(keep)s
    FROM unnest(%(args)s::text[], %(kwargs)s::text[], %(keys)s::text[], %(limit_keys)s::text[])
         AS t(args, kwargs, unique_key, limit_key)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND failed_at IS NULL DO NOTHING
    RETURNING id, unique_key
), woken AS (
    SELECT pg_notify('""" + NOTIFY_CHANNEL + """', """ + _WAKE_AT.format(
        queue="%(queue)s", priority="%(priority)s", run_at="coalesce(%(run_at)s, now())", id="min(id)") + """)
    FROM inserted HAVING count(*) > 0
)
SELECT id, unique_key, (SELECT count(*) FROM woken) FROM inserted
"""

# Jobs enqueued with after=[...] (dj/dependencies.py): one statement, so that the dependencies'
# state and the new rows are one atomic step on any connection.
# - Each listed job still in jobs gets has_dependents set by an UPDATE. That is also its row lock,
#   held to commit: a COMPLETE, FAIL or CANCEL of it waits for this transaction, then re-reads the
#   row, sees the flag and settles the dependents with a fresh snapshot (migration 0009). If it
#   finished first, the UPDATE waits for it and finds the row gone (succeeded) or dead.
# - A listed job that is not there is taken as succeeded (a success deletes its row) if the id
#   was ever drawn from jobs_id_seq; otherwise the id is unknown, and nothing is inserted: the
#   statement returns the unknown ids and the caller raises. A batch the same way on batches (its
#   row stays): unknown if absent; succeeded if finished with no dead job; dead if finished with one.
# - The new jobs wait (run_at 'infinity', out of the claim's `run_at <= now()`) while a dependency
#   is unfinished, with one job_dependencies row for each such dependency; are dead at once, naming
#   it, if one is dead (and count towards their batch as dead); and are ready otherwise.
# Unique keys, limit keys, keep and the NOTIFY as in ENQUEUE; the NOTIFY only if a ready job went
# in. A keyed dependent, once released, takes its place in its key's order by its release time.
ENQUEUE_AFTER = """
WITH job_deps AS (
    UPDATE jobs SET has_dependents = true
    WHERE id = ANY(%(after_jobs)s::bigint[])
    RETURNING id, failed_at IS NOT NULL AS dead
), batch_deps AS (
    UPDATE batches SET has_dependents = true
    WHERE id = ANY(%(after_batches)s::bigint[])
    RETURNING id, finished_at IS NOT NULL AS finished, dead > 0 AS dead
), unknown AS (
    SELECT 'job ' || j.id AS what FROM unnest(%(after_jobs)s::bigint[]) AS j(id)
    WHERE j.id NOT IN (SELECT id FROM job_deps)
      AND (j.id < 1 OR j.id > (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM jobs_id_seq))
    UNION ALL
    SELECT 'batch ' || b.id FROM unnest(%(after_batches)s::bigint[]) AS b(id)
    WHERE b.id NOT IN (SELECT id FROM batch_deps)
), verdict AS (
    SELECT (SELECT count(*) FROM job_deps WHERE NOT dead) + (SELECT count(*) FROM batch_deps WHERE NOT finished)
               AS unfinished,
           coalesce((SELECT 'dependency job ' || id || ' is dead' FROM job_deps WHERE dead ORDER BY id LIMIT 1),
                    (SELECT 'dependency batch ' || id || ' finished with dead or cancelled jobs' FROM batch_deps
                     WHERE finished AND dead ORDER BY id LIMIT 1)) AS dead_why
), inserted AS (
    INSERT INTO jobs (queue, priority, task, args, kwargs, run_at, max_attempts, timeout, unique_key, batch_id,
                      failed_at, last_error, limit_key, key_limit, trace_context, keep)
    SELECT %(queue)s, %(priority)s, %(task)s, t.args::jsonb, t.kwargs::jsonb,
           CASE WHEN v.dead_why IS NULL AND v.unfinished > 0 THEN timestamptz 'infinity' ELSE now() END,
           %(max_attempts)s, %(timeout)s, t.unique_key, %(batch_id)s,
           CASE WHEN v.dead_why IS NOT NULL THEN now() END, v.dead_why, t.limit_key, %(key_limit)s,
           %(trace_context)s::jsonb, %(keep)s
    FROM unnest(%(args)s::text[], %(kwargs)s::text[], %(keys)s::text[], %(limit_keys)s::text[])
         AS t(args, kwargs, unique_key, limit_key), verdict AS v
    WHERE NOT EXISTS (SELECT FROM unknown)
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND failed_at IS NULL DO NOTHING
    RETURNING id, unique_key, run_at = 'infinity' AS waiting, failed_at IS NOT NULL AS dead
), links AS (
    INSERT INTO job_dependencies (job_id, after_job, after_batch)
    SELECT i.id, d.id, NULL FROM inserted AS i, job_deps AS d WHERE i.waiting AND NOT d.dead
    UNION ALL
    SELECT i.id, NULL, b.id FROM inserted AS i, batch_deps AS b WHERE i.waiting AND NOT b.finished
), born_dead AS (
    UPDATE batches SET dead = dead + (SELECT count(*) FROM inserted WHERE dead)
    WHERE id = %(batch_id)s AND EXISTS (SELECT FROM inserted WHERE dead)
), woken AS (
    SELECT pg_notify('""" + NOTIFY_CHANNEL + """', %(queue)s)
    WHERE EXISTS (SELECT FROM inserted WHERE NOT waiting AND NOT dead)
)
SELECT id, unique_key, (SELECT count(*) FROM woken), NULL FROM inserted
UNION ALL
SELECT NULL, NULL, 0, string_agg(what, ', ') FROM unknown HAVING count(*) > 0
"""

# Ids for a bulk enqueue by COPY, which cannot return them. They come in increasing order.
# The sequence is named, not looked up: pg_get_serial_sequence() inside nextval() runs once per
# row, and took 3 us of each job's 9 (the identity column's sequence is jobs_id_seq by
# PostgreSQL's naming; test_enqueue checks that it is).
DRAW_JOB_IDS = "SELECT nextval('jobs_id_seq') FROM generate_series(1, %s) ORDER BY 1"

# The jobs that hold the given unique keys: what an enqueue of an already-held key returns.
HOLDERS_OF_KEYS = """
SELECT unique_key, id FROM jobs WHERE unique_key = ANY(%s::text[]) AND failed_at IS NULL
"""

# NOTIFY is delivered at commit, so a worker never wakes for a job it cannot see yet, and a
# rolled-back enqueue wakes nobody. One per enqueue call, not per row.
NOTIFY = "SELECT pg_notify('" + NOTIFY_CHANNEL + "', %s)"

# A COPY enqueue's NOTIFY: where its first job sits (all its rows share queue, priority and run_at,
# and their ids increase), read back from the row itself so that it is exact, as an INSERT's
# RETURNING is. With the queue alone every worker would read from the head of the claim index,
# which under an old snapshot means every dead entry since (see CLAIM). The queue alone if the row
# is not there to read.
NOTIFY_COPY = """
SELECT pg_notify('""" + NOTIFY_CHANNEL + """', coalesce((
    SELECT """ + _WAKE_AT.format(queue="queue", priority="priority", run_at="run_at", id="id") + """
    FROM jobs WHERE id = %(id)s), %(queue)s))
"""

# --- claim ---------------------------------------------------------------------------------------

# Claimers of a queue with a concurrency limit take this lock first, in its own statement, so the
# CLAIM that follows counts the running jobs with a snapshot taken after the previous claimer
# committed. Counting inside one statement would let two claimers both see room for the last slot.
#
# A queue with a rate limit takes the same lock, for the same reason: the claim counts the starts
# in the queue's sliding log (rate_starts) and must see every claim committed before it. The second
# column tells the worker that one of its queues has a rate limit (it then sends RATE_WAIT).
LOCK_LIMITED_QUEUES = """
SELECT pg_advisory_xact_lock(1684761200, hashtext(queue)), rate_limit IS NOT NULL
FROM queue_settings
WHERE queue = ANY(%(queues)s::text[]) AND (concurrency_limit IS NOT NULL OR rate_limit IS NOT NULL)
ORDER BY queue
"""

# The same for the tasks with @job(rate=...) that the worker knows, after the queues' locks (every
# worker takes queue locks first, then task locks, each in name order, so none can deadlock).
LOCK_RATED_TASKS = """
SELECT pg_advisory_xact_lock(1684761202, hashtext(name))
FROM unnest(%(rated_tasks)s::text[]) AS name
ORDER BY name
"""

# Per-key limits (@job(limit_by=..., limit=N)). A claimer takes a transaction-scoped advisory lock
# per key, in this statement of its own, before CLAIM counts the key's running jobs: as with
# LOCK_LIMITED_QUEUES, the count then sees every earlier claim of that key committed, where two
# claimers counting inside one statement could both see room for the last slot. It only tries
# each lock: a key that another claimer holds right now is that claimer's to serve, so this one
# skips it this time instead of waiting behind that whole transaction. Only CLAIM's keyed part
# sets locked_by on a keyed job, and only for keys in this list, so every claim of a key runs
# under its lock; everything else about a key's jobs (a completion, a failure, the reaper, a
# hand-back) only lowers the count, which a stale snapshot can only overstate.
#
# Which keys: those with ready jobs in the worker's queues, found by skipping through
# jobs_keyed_idx from one key to the next (one index probe per key), starting after the last key
# the worker looked at and taking at most %(max_keys)s per queue, so a claim's cost and lock count
# stay bounded with many keys, and every key comes round (dj.worker.producer.KEYS_PER_CLAIM).
# The locked keys go to CLAIM as a transaction-local setting, not a session's state, so this works
# behind a transaction pooler. Returns the last key looked at, or NULL when the walk reached the end.
LOCK_KEYS = """
WITH RECURSIVE walk AS (
    SELECT q.name AS queue, 1 AS n, (
        SELECT j.limit_key FROM jobs j
        WHERE j.queue = q.name AND j.limit_key > coalesce(%(after_key)s, '')
          AND j.locked_by IS NULL AND j.failed_at IS NULL AND j.limit_key IS NOT NULL
        ORDER BY j.limit_key LIMIT 1) AS limit_key
    FROM unnest(%(queues)s::text[]) AS q(name)
    UNION ALL
    SELECT w.queue, w.n + 1, (
        SELECT j.limit_key FROM jobs j
        WHERE j.queue = w.queue AND j.limit_key > w.limit_key
          AND j.locked_by IS NULL AND j.failed_at IS NULL AND j.limit_key IS NOT NULL
        ORDER BY j.limit_key LIMIT 1)
    FROM walk w WHERE w.limit_key IS NOT NULL AND w.n < %(max_keys)s
), seen AS (
    SELECT DISTINCT limit_key FROM walk WHERE limit_key IS NOT NULL
), locked AS (
    SELECT limit_key FROM seen WHERE pg_try_advisory_xact_lock(1684761201, hashtext(limit_key))
)
SELECT set_config('dj.claim_keys', coalesce((SELECT array_agg(limit_key) FROM locked), '{}')::text, true),
       CASE WHEN (SELECT max(n) FROM walk WHERE limit_key IS NOT NULL) >= %(max_keys)s
            THEN (SELECT max(limit_key) FROM seen) END
"""

# For each of the worker's queues that is not paused, read jobs_claim_idx in (priority, run_at, id)
# order and lock up to `room` free rows, skipping rows that another worker is locking right now;
# `room` is the worker's free capacity, cut down to what the queue's concurrency limit leaves.
# Then keep the best `limit` over all queues. A per-queue LATERAL keeps every index read ordered
# and short: a plain `queue = ANY(...)` would make PostgreSQL sort every ready row of those queues
# on every claim. Rows locked by a lateral but cut by the outer LIMIT are unlocked at commit.
#
# Each queue's read starts after a position the worker passes in: (priority, run_at, id) of the
# last job it claimed from that queue, or the head (min_priority, -infinity, 0). The row comparison
# is an index bound, so the read starts there instead of at the index's head. That matters while
# another session holds an old snapshot: every job drained since then leaves an index entry that
# no scan may mark dead, since that snapshot may still see its row, and a read from the head
# visits the heap for each (measured with 200k such entries: 35 ms and 5,562 buffers for a
# 1,000-job claim from the head, 1.1 ms and 32 buffers from the position). The worker goes back to
# the head whenever a job may have landed before its position, and at least every few seconds:
# dj.cursors says when. Claim order is unchanged: a job before the position is either claimed or
# locked by another worker, or was put there later, which sends the worker back.
#
# Rate limits (dj/rates.py has the argument): a queue with one gets at most what its sliding log
# leaves in the last period, `room` cut to `rate_limit - starts since clock.at - rate_period`, and
# its claims are logged in rate_starts (one row per claim, in `logged`, counted from `picked`: the
# UPDATE changes every row picked, since the read locked them). A claim is the "start" a
# rate limit counts, and its time, `clock.at`, is both the log's time and the jobs' locked_at. It is
# read with clock_timestamp() after the lock (LOCK_LIMITED_QUEUES) was granted, not now() (the
# transaction's start, before the wait): so the claims of one key get increasing times in lock
# order, which makes pruning the log safe (RATE_WAIT). A queue without a rate limit pays for one
# clock read and `logged` joining its claimed rows to no queue.
#
# Jobs with a per-key limit are not in jobs_claim_idx (so `limit_key IS NULL` above, which also
# lets the planner use that index). They come from `keyed`: for each key LOCK_KEYS locked and each
# queue, the key's head in jobs_keyed_idx, in claim order, as many as the key has room for: its
# limit (the one its head job was enqueued with) less its running jobs, counted through
# jobs_keyed_running_idx. The window then holds a key to its limit across several queues. A key's
# read always starts at its head, never at the remembered position, so a job held back by its key
# is never skipped past: it is the first one read when its key has room again. They join the plain
# candidates in (priority, run_at, id) order under the same LIMIT, so a claim stays one round trip
# for many jobs, and a key at its limit holds back only its own jobs. A queue's room (its
# concurrency limit) is shared: the keyed rows take theirs first, the plain read the rest. With no
# keys (a worker that knows no keyed task never sets dj.claim_keys) all of this reads nothing.
#
# It returns args and kwargs as text and run_at as microseconds since the epoch (exact, so the
# worker can pass a position back; and cheaper to decode than jsonb and timestamptz, see
# dj.worker.jobs._load_job_json).
# trace_context (text, decoded only by a worker that traces) is NULL but for jobs enqueued inside
# an OpenTelemetry span (dj/tracing.py): on the wire that is 4 bytes a row, and nothing is decoded.
# keep: whether the worker records the success with COMPLETE_KEEP, with the return value,
# instead of COMPLETE.
CLAIM = """
WITH clock AS MATERIALIZED (
    SELECT clock_timestamp() AS at
), open_queues AS (
    SELECT q.name, q.after_priority,
           CASE WHEN q.after_micros IS NULL THEN timestamptz '-infinity'
                ELSE timestamptz 'epoch' + q.after_micros * interval '1 microsecond' END AS after_run_at,
           coalesce(q.after_id, 0) AS after_id,
           least(CASE WHEN s.concurrency_limit IS NULL THEN %(limit)s
                ELSE least(%(limit)s, greatest(0, s.concurrency_limit - (
                    SELECT count(*) FROM jobs r
                    WHERE r.queue = q.name AND r.locked_by IS NOT NULL AND r.failed_at IS NULL)))
           END,
           CASE WHEN s.rate_limit IS NOT NULL THEN greatest(0, s.rate_limit - (
                    SELECT coalesce(sum(r.n), 0) FROM rate_starts r, clock
                    WHERE r.key = 'queue:' || q.name AND r.started_at > clock.at - s.rate_period * interval '1 second'))
           END) AS room,
           s.rate_limit, s.rate_period
    FROM unnest(%(queues)s::text[], %(after_priority)s::int2[], %(after_micros)s::int8[], %(after_id)s::int8[])
         AS q(name, after_priority, after_micros, after_id)
    LEFT JOIN queue_settings s ON s.queue = q.name
    WHERE s.paused IS NOT TRUE
), keys AS (
    SELECT k.limit_key, (SELECT count(*) FROM jobs r
                         WHERE r.limit_key = k.limit_key AND r.locked_by IS NOT NULL AND r.failed_at IS NULL
                        ) AS running
    FROM unnest(nullif(current_setting('dj.claim_keys', true), '')::text[]) AS k(limit_key)
), keyed_heads AS (
    SELECT c.id, c.priority, c.run_at, q.name AS queue, q.room,
           k.running + row_number() OVER (PARTITION BY k.limit_key ORDER BY c.priority, c.run_at, c.id)
               <= c.key_limit AS fits
    FROM open_queues AS q
    CROSS JOIN keys AS k
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at, key_limit
        FROM jobs
        WHERE queue = q.name AND limit_key = k.limit_key
          AND locked_by IS NULL AND failed_at IS NULL
          AND priority BETWEEN %(min_priority)s AND %(max_priority)s
          AND run_at <= now()
        ORDER BY priority, run_at, id
        LIMIT least(q.room, greatest(0, (
            SELECT h.key_limit FROM jobs h
            WHERE h.queue = q.name AND h.limit_key = k.limit_key
              AND h.locked_by IS NULL AND h.failed_at IS NULL AND h.limit_key IS NOT NULL
            ORDER BY h.priority, h.run_at, h.id LIMIT 1) - k.running))
        FOR UPDATE SKIP LOCKED
    ) AS c
), keyed AS (
    -- The keyed rows that fit their key, and the queue's room (its concurrency limit) too.
    SELECT id, priority, run_at, queue
    FROM (SELECT h.*, row_number() OVER (PARTITION BY h.queue ORDER BY h.priority, h.run_at, h.id) AS n
          FROM keyed_heads AS h WHERE h.fits) AS h
    WHERE n <= room
), picked AS (
    SELECT c.id, c.queue
    FROM (
        SELECT c.id, c.priority, c.run_at, q.name AS queue
        FROM open_queues AS q
        CROSS JOIN LATERAL (
            SELECT id, priority, run_at
            FROM jobs
            WHERE queue = q.name
              AND locked_by IS NULL AND failed_at IS NULL AND limit_key IS NULL
              AND priority BETWEEN %(min_priority)s AND %(max_priority)s
              AND (priority, run_at, id) > (q.after_priority, q.after_run_at, q.after_id)
              AND run_at <= now()
            ORDER BY priority, run_at, id
            LIMIT q.room - (SELECT count(*) FROM keyed WHERE keyed.queue = q.name)
            FOR UPDATE SKIP LOCKED
        ) AS c
        UNION ALL
        SELECT id, priority, run_at, queue FROM keyed
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
), logged AS (
    INSERT INTO rate_starts AS r (key, started_at, n, max_starts, period)
    SELECT 'queue:' || q.name, (SELECT at FROM clock), count(*), q.rate_limit, q.rate_period
    FROM open_queues q JOIN picked p ON p.queue = q.name
    WHERE q.rate_limit IS NOT NULL
    GROUP BY q.name, q.rate_limit, q.rate_period
    ON CONFLICT (key, started_at) DO UPDATE SET n = r.n + EXCLUDED.n
)
UPDATE jobs
SET locked_by = %(worker)s, locked_at = (SELECT at FROM clock), attempts = jobs.attempts + 1
WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING jobs.id, jobs.task, jobs.args::text, jobs.kwargs::text, jobs.attempts, jobs.max_attempts,
          jobs.timeout, jobs.queue, jobs.priority, (extract(epoch FROM jobs.run_at) * 1000000)::int8,
          jobs.trace_context::text, jobs.keep
"""

def _with_task_rates(claim: str) -> str:
    """CLAIM for a worker that knows tasks with @job(rate=...): CLAIM with three additions, made by
    replacing exact lines so that CLAIM stays the one text to read and change.

    - `task_rates`: each such task's allowance, counted like a queue's in its sliding log.
    - Each queue's read skips the jobs of tasks with no allowance left, so they do not block the
      queue: they stay ready and keep their place, and the worker reads from the head again when
      a slot frees (dj/rates.py). The read filters on task, which jobs_claim_idx does not hold, so
      it walks the held jobs' entries: a backlog of a rated task is best kept in its own queue.
    - `kept` cuts each rated task's rows down to its allowance, in claim order; the rows cut were
      locked FOR UPDATE by the read and are unlocked at commit, unchanged. `logged_tasks` logs the
      rest, and `logged` counts the queues' starts from it."""
    def swap(old: str, new: str) -> None:
        nonlocal claim
        assert claim.count(old) == 1, old
        claim = claim.replace(old, new)

    swap("\n), picked AS (", """
), task_rates AS (
    SELECT t.name, t.max_starts, t.period, greatest(0, t.max_starts - (
               SELECT coalesce(sum(r.n), 0) FROM rate_starts r, clock
               WHERE r.key = 'task:' || t.name AND r.started_at > clock.at - t.period * interval '1 second')) AS room
    FROM unnest(%(rated_tasks)s::text[], %(rated_max)s::int[], %(rated_period)s::float8[]) AS t(name, max_starts, period)
), picked AS (""")
    swap("AND (priority, run_at, id) > (q.after_priority, q.after_run_at, q.after_id)\n",
         "AND (priority, run_at, id) > (q.after_priority, q.after_run_at, q.after_id)\n"
         "              AND task <> ALL(ARRAY(SELECT name FROM task_rates WHERE room = 0))\n")
    swap("\n), logged AS (", """
), kept AS (
    SELECT p.id, p.queue, p.task
    FROM (SELECT j.id, j.queue, j.task,
                 row_number() OVER (PARTITION BY j.task ORDER BY j.priority, j.run_at, j.id) AS nth
          FROM jobs j WHERE j.id = ANY(ARRAY(SELECT id FROM picked))) AS p
    LEFT JOIN task_rates t ON t.name = p.task
    WHERE t.room IS NULL OR p.nth <= t.room
), logged_tasks AS (
    INSERT INTO rate_starts AS r (key, started_at, n, max_starts, period)
    SELECT 'task:' || t.name, (SELECT at FROM clock), count(*), t.max_starts, t.period
    FROM task_rates t JOIN kept p ON p.task = t.name
    GROUP BY t.name, t.max_starts, t.period
    ON CONFLICT (key, started_at) DO UPDATE SET n = r.n + EXCLUDED.n
), logged AS (""")
    swap("FROM open_queues q JOIN picked p ON p.queue = q.name", "FROM open_queues q JOIN kept p ON p.queue = q.name")
    swap("WHERE jobs.id = ANY(ARRAY(SELECT id FROM picked))", "WHERE jobs.id = ANY(ARRAY(SELECT id FROM kept))")
    return claim


CLAIM_RATED_TASKS = _with_task_rates(CLAIM)

# Sent after the claim, in the same transaction (so under the same locks), by a worker whose
# queues or tasks have a rate limit. It prunes each key's log of the rows that have left its window,
# and returns, for each key that has used its whole allowance while ready jobs of it wait in the
# worker's queues, the seconds until its oldest start in the window leaves it, which frees a slot.
# The worker sleeps that long instead of polling, and `dj work --burst` does not exit while such a
# row comes back. Pruning under the lock is safe: claims take their time after the lock (see
# CLAIM), so no later claim has an earlier time, and a row out of this window is out of theirs.
RATE_WAIT = """
WITH keys AS (
    SELECT 'queue:' || s.queue AS key, s.rate_limit AS max_starts, s.rate_period AS period,
           s.queue, NULL::text AS task
    FROM queue_settings s
    WHERE s.queue = ANY(%(queues)s::text[]) AND s.rate_limit IS NOT NULL AND s.paused IS NOT TRUE
    UNION ALL
    SELECT 'task:' || t.name, t.max_starts, t.period, NULL, t.name
    FROM unnest(%(rated_tasks)s::text[], %(rated_max)s::int[], %(rated_period)s::float8[]) AS t(name, max_starts, period)
), pruned AS (
    DELETE FROM rate_starts r USING keys k
    WHERE r.key = k.key AND r.started_at <= clock_timestamp() - k.period * interval '1 second'
)
SELECT extract(epoch FROM min(r.started_at) + k.period * interval '1 second' - clock_timestamp())::float8
FROM keys k
JOIN rate_starts r ON r.key = k.key AND r.started_at > clock_timestamp() - k.period * interval '1 second'
GROUP BY k.key, k.max_starts, k.period, k.queue, k.task
HAVING sum(r.n) >= k.max_starts AND CASE
    WHEN k.queue IS NOT NULL THEN EXISTS (
        SELECT FROM jobs j
        WHERE j.queue = k.queue AND j.locked_by IS NULL AND j.failed_at IS NULL AND j.run_at <= now())
    ELSE EXISTS (
        SELECT FROM jobs j
        WHERE j.queue = ANY(%(queues)s::text[]) AND j.task = k.task
          AND j.locked_by IS NULL AND j.failed_at IS NULL AND j.run_at <= now())
    END
"""

# Where each open queue's first ready job sits, in claim order, after a given position (as in
# CLAIM; the head is (min_priority, -infinity, 0)); and which of the queues are paused. Open means
# not paused and with room under its concurrency limit, counted as in CLAIM's open_queues. No lock,
# no write: per queue, one read of jobs_claim_idx that stops at its first ready entry. The ORDER BY
# is the index's own and keeps it an index read: a plain EXISTS was planned as a scan of the table,
# all of it for an empty queue. The last column is the server's time, by which callers space their
# next run (on a loaded machine a round trip's time is mostly waiting for a CPU).
#
# Two callers:
# - the notifier, behind a transaction pooler without DJ_LISTEN_URL, where no NOTIFY reaches a
#   worker: every poll interval (0.1 s by default), from the worker's claim positions, so that it
#   stays cheap under an old snapshot. It tells the worker what an enqueue's NOTIFY would have
#   said (see _WAKE_AT and dj.cursors), and which queues were paused (the settings NOTIFY);
# - the maintenance thread, from the head, at least every second (the probe of dj.cursors): what
#   no NOTIFY announces, and a job put before the position where no NOTIFY reaches.
#
# Jobs with a per-key limit are left out (a held one would wake every worker at every poll, for
# nothing): behind a pooler without DJ_LISTEN_URL, the worker's own poll interval finds them.
POLL = """
SELECT q.name, s.paused IS TRUE, j.priority, (extract(epoch FROM j.run_at) * 1000000)::int8, j.id,
       extract(epoch FROM clock_timestamp() - statement_timestamp())
FROM unnest(%(queues)s::text[], %(after_priority)s::int2[], %(after_micros)s::int8[], %(after_id)s::int8[])
     AS q(name, after_priority, after_micros, after_id)
LEFT JOIN queue_settings s ON s.queue = q.name
LEFT JOIN LATERAL (
    SELECT priority, run_at, id
    FROM jobs
    WHERE queue = q.name
      AND locked_by IS NULL AND failed_at IS NULL AND limit_key IS NULL
      AND priority BETWEEN %(min_priority)s AND %(max_priority)s
      AND (priority, run_at, id) > (q.after_priority,
                                    CASE WHEN q.after_micros IS NULL THEN timestamptz '-infinity'
                                         ELSE timestamptz 'epoch' + q.after_micros * interval '1 microsecond' END,
                                    coalesce(q.after_id, 0))
      AND run_at <= now()
    ORDER BY priority, run_at, id
    LIMIT 1
) AS j ON s.paused IS NOT TRUE
      AND (s.concurrency_limit IS NULL OR s.concurrency_limit > (
           SELECT count(*) FROM jobs r
           WHERE r.queue = q.name AND r.locked_by IS NOT NULL AND r.failed_at IS NULL))
"""


# `dj work --burst` asks this before it exits: is a job with a per-key limit ready in its queues?
# Such a job may be held back only by its key's running jobs (this worker's or another's), and can
# run once one of them finishes, so the worker waits (for that completion's NOTIFY, or its poll
# interval) instead of exiting. One probe of jobs_keyed_idx per queue.
KEYED_WAITING = """
SELECT EXISTS (
    SELECT FROM unnest(%(queues)s::text[]) AS q(name)
    WHERE EXISTS (
        SELECT FROM jobs
        WHERE queue = q.name AND limit_key IS NOT NULL
          AND locked_by IS NULL AND failed_at IS NULL
          AND priority BETWEEN %(min_priority)s AND %(max_priority)s
          AND run_at <= now()))
"""

# For `dj status`, /metrics and the dashboard: the keys at their limit (their running jobs, in
# jobs_keyed_running_idx, are few) and how many ready jobs each holds back, counted up to 10,000
# through jobs_keyed_idx, so the cost stays bounded however long a key's backlog is.
KEYS_AT_LIMIT = """
SELECT r.limit_key, r.queue, r.running, r.key_limit, (
    SELECT count(*) FROM (
        SELECT FROM jobs j
        WHERE j.queue = r.queue AND j.limit_key = r.limit_key
          AND j.locked_by IS NULL AND j.failed_at IS NULL AND j.run_at <= now()
        LIMIT 10000) AS h) AS held
FROM (SELECT limit_key, min(queue) AS queue, count(*) AS running, min(key_limit) AS key_limit
      FROM jobs WHERE locked_by IS NOT NULL AND limit_key IS NOT NULL AND failed_at IS NULL
      GROUP BY limit_key) AS r
WHERE r.running >= r.key_limit
ORDER BY held DESC, r.limit_key
LIMIT %(top)s
"""

# --- finish an attempt ---------------------------------------------------------------------------

# The tail shared by every statement that can finish a batch: enqueue the callback of each batch
# that `batch_progress` just finished, and wake the workers of its queue.
_ENQUEUE_BATCH_CALLBACKS = """callbacks AS (
    INSERT INTO jobs (queue, task, args, kwargs)
    SELECT queue, on_complete, args, kwargs || jsonb_build_object('batch', jsonb_build_object(
               'id', id, 'total', total, 'succeeded', succeeded, 'dead', dead))
    FROM batch_progress WHERE finished_at IS NOT NULL AND on_complete IS NOT NULL
    RETURNING queue
)"""



def _stats_from(source: str, outcome: str) -> str:
    """The `stats` CTE shared by COMPLETE and FAIL: add the (queue, seconds) rows of `source` to
    job_stats as `outcome` ("succeeded" or "failed"), with their run time (sum and histogram).
    Groups are upserted in queue order so two workers bumping the same buckets always lock them in
    the same order and cannot deadlock."""
    return f"""stats AS (
    INSERT INTO job_stats AS s (bucket, queue, {outcome}, run_seconds,
                                run_le_0_01, run_le_0_1, run_le_1, run_le_10, run_le_60)
    SELECT date_bin('10 seconds', now(), timestamptz '2000-01-01'), queue, count(*), sum(seconds),
           count(*) FILTER (WHERE seconds <= 0.01), count(*) FILTER (WHERE seconds <= 0.1),
           count(*) FILTER (WHERE seconds <= 1), count(*) FILTER (WHERE seconds <= 10),
           count(*) FILTER (WHERE seconds <= 60)
    FROM {source} GROUP BY queue ORDER BY queue
    ON CONFLICT (bucket, queue) DO UPDATE
    SET {outcome} = s.{outcome} + EXCLUDED.{outcome}, run_seconds = s.run_seconds + EXCLUDED.run_seconds,
        run_le_0_01 = s.run_le_0_01 + EXCLUDED.run_le_0_01, run_le_0_1 = s.run_le_0_1 + EXCLUDED.run_le_0_1,
        run_le_1 = s.run_le_1 + EXCLUDED.run_le_1, run_le_10 = s.run_le_10 + EXCLUDED.run_le_10,
        run_le_60 = s.run_le_60 + EXCLUDED.run_le_60
)"""


# The last line of an error (a traceback's last line says what went wrong), for a dependent's
# last_error when its dependency died.
_LAST_LINE = "substring(rtrim({0}, E' \\n') FROM '[^\\n]*$')"

# Dependencies (dj/dependencies.py). A job that something waits for has has_dependents set; the
# statements that finish jobs return its id (dependents_of) and, only if there is one, or a batch
# with dependents finished, call dj_settle_dependents (migration 0009), which releases or kills
# the dependents and says which queues to wake. The function takes a fresh snapshot for each of
# its statements, which is why it is a function: a dependent enqueued while this statement ran is
# invisible to this statement's snapshot. For the jobs without dependents (nearly all), the cost is
# the flag in RETURNING and two probes of a CTE that the WHERE below finds empty, so the function is
# not called (a one-time filter). The function runs after the batch updates and before the
# job_stats upsert (which runs last, at the end of the statement), in every statement, so the
# statements take their row locks in one order: jobs, batches, dependents, job_stats.

def _finish_successes() -> str:
    """The tail shared by COMPLETE and COMPLETE_KEEP, after their `done` CTE (the deleted rows, with
    queue, batch_id, seconds, dependents_of and limit_key): wake the workers of freed limited queues
    and keys, record the stats, advance batches and enqueue their callbacks, settle dependents, and
    NOTIFY each queue that got work."""
    return """), freed AS (
    -- A finished job frees a slot of a limited queue, or of its key: wake the workers that may be
    -- waiting for it (a key's held jobs are read from its head, see CLAIM).
    SELECT queue FROM queue_settings
    WHERE concurrency_limit IS NOT NULL AND queue IN (SELECT queue FROM done)
    UNION SELECT queue FROM done WHERE limit_key IS NOT NULL
), """ + _stats_from("done", "succeeded") + """, batch_progress AS (
    UPDATE batches AS b
    SET succeeded = b.succeeded + n.count,
        finished_at = CASE WHEN b.succeeded + n.count + b.dead = b.total THEN now() END
    FROM (SELECT batch_id, count(*)::int AS count FROM done WHERE batch_id IS NOT NULL GROUP BY batch_id) AS n
    WHERE b.id = n.batch_id
    RETURNING b.*
), """ + _ENQUEUE_BATCH_CALLBACKS + """, settled AS (
    SELECT s.queue
    FROM (SELECT array_agg(dependents_of) AS ids FROM done WHERE dependents_of IS NOT NULL) AS j,
         (SELECT array_agg(id) FILTER (WHERE dead = 0) AS ok, array_agg(id) FILTER (WHERE dead > 0) AS bad
          FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents) AS b,
         LATERAL dj_settle_dependents(j.ids, b.ok, NULL, NULL, b.bad) AS s(queue)
    WHERE j.ids IS NOT NULL OR b.ok IS NOT NULL OR b.bad IS NOT NULL
)
SELECT queue, pg_notify('""" + NOTIFY_CHANNEL + """', queue)
FROM (SELECT queue FROM callbacks UNION SELECT queue FROM freed UNION SELECT queue FROM settled) AS wake
"""


# The fence. COMPLETE, FAIL and RELEASE change a row only if it is still the same attempt by the
# same worker: (id, attempts, locked_by) all match what the worker claimed. The worker's outcomes
# come in as arrays, unnested into a materialized CTE that also carries the worker's name, so the
# fence on locked_by is a join filter (IS NOT DISTINCT FROM, which no index serves), not a
# condition on jobs. That is deliberate. The statistics of locked_by describe a queue at rest,
# where nothing is locked, so a condition `locked_by = worker` on jobs is estimated at one row,
# and with that estimate PostgreSQL scanned the worker's locked rows and, for each, the whole
# outcome list again: a quadratic plan, seen taking 50-190 ms for 500 outcomes in a drain of a
# 1M-job backlog (10k jobs/s instead of 70k). With `jobs.id = ANY(ids)` as the only condition on
# jobs, its estimate is right (ids are unique) and the plan is linear: probe the primary key per
# outcome, or hash one side.
#
# Successes are deleted, as in DelayedJob, so the hot table holds only unfinished work; the count
# and the run time go to job_stats (see _stats_from).
#
# Batches: the statement that brings a batch's succeeded + dead up to its total is the one that
# enqueues the callback. The batch row's lock serialises those updates, and an UPDATE that waited
# for the lock re-reads the row, so exactly one of them sees the count reach the total.
COMPLETE = """
WITH d AS MATERIALIZED (
    SELECT d.*, %(worker)s::text AS worker
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(seconds)s::float8[]) AS d(id, attempts, seconds)
), done AS (
    DELETE FROM jobs
    USING d
    WHERE jobs.id = ANY(%(ids)s::bigint[])
      AND jobs.id = d.id AND jobs.attempts = d.attempts AND jobs.locked_by IS NOT DISTINCT FROM d.worker
    RETURNING jobs.queue, jobs.batch_id, d.seconds, CASE WHEN jobs.has_dependents THEN jobs.id END AS dependents_of,
              jobs.limit_key
""" + _finish_successes() + """"""

# COMPLETE for successes of jobs enqueued with keep=...: a separate statement, which the worker
# runs only for a flush that holds such jobs, so COMPLETE itself (the hottest statement) is
# unchanged when nothing is kept. It moves each row from jobs to job_results in the same statement
# that deletes it, with the return value (JSON text, or NULL and the reason it could not be kept),
# the run time, and when it expires. Kept rows are never in jobs, so jobs_claim_idx and every claim
# stay as they are however many pile up (measured: see docs/ARCHITECTURE.md); the alternative, a
# 'succeeded' row left in jobs, would keep the heap and every non-partial index of the hot table
# growing with the history. The fence, the stats, the batch progress and the wake-ups are COMPLETE's.
# The ids of the kept jobs go out on RESULTS_CHANNEL, which ends the waits of dj.result().
COMPLETE_KEEP = """
WITH d AS MATERIALIZED (
    SELECT d.*, %(worker)s::text AS worker
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(seconds)s::float8[], %(results)s::text[],
                %(errors)s::text[]) AS d(id, attempts, seconds, result, result_error)
), done AS (
    DELETE FROM jobs
    USING d
    WHERE jobs.id = ANY(%(ids)s::bigint[])
      AND jobs.id = d.id AND jobs.attempts = d.attempts AND jobs.locked_by IS NOT DISTINCT FROM d.worker
    RETURNING jobs.id, jobs.queue, jobs.priority, jobs.task, jobs.args, jobs.kwargs, jobs.attempts,
              jobs.max_attempts, jobs.batch_id, jobs.created_at, jobs.run_at, coalesce(jobs.keep, 0) AS keep,
              d.seconds, d.result, d.result_error, CASE WHEN jobs.has_dependents THEN jobs.id END AS dependents_of,
              jobs.limit_key
), kept AS (
    INSERT INTO job_results (id, queue, priority, task, args, kwargs, attempts, max_attempts, batch_id,
                             created_at, run_at, finished_at, expires_at, run_seconds, result, result_error)
    SELECT id, queue, priority, task, args, kwargs, attempts, max_attempts, batch_id, created_at, run_at,
           now(), now() + keep * interval '1 second', seconds, result::jsonb, result_error
    FROM done
    RETURNING id
), told AS (
    -- One NOTIFY per 300 kept jobs (their ids, comma-separated: under the 8000-byte payload limit),
    -- not one per job: every session that LISTENs on any channel (each worker's notifier) reads
    -- every notification queued, so a drain of kept jobs must not queue thousands a second.
    SELECT pg_notify('""" + RESULTS_CHANNEL + """', string_agg(id::text, ','))
    FROM (SELECT id, (row_number() OVER () - 1) / 300 AS chunk FROM kept) AS k
    GROUP BY chunk
""" + _finish_successes() + """UNION ALL
SELECT NULL, NULL FROM (SELECT count(*) FROM told) AS t  -- a plain CTE runs only if read: this makes it run
"""

# A failed attempt either waits for its retry (run_at moves to the future) or is dead (failed_at).
# A dead job counts towards its batch like a success does. A failed job with a per-key limit frees
# its key's slot: its queue's workers are woken, as COMPLETE does.
FAIL = """
WITH f AS MATERIALIZED (  -- the fence: see COMPLETE
    SELECT f.*, %(worker)s::text AS worker
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(errors)s::text[], %(delays)s::float8[],
                %(dead)s::bool[], %(seconds)s::float8[]) AS f(id, attempts, error, delay, dead, seconds)
), failed AS (
    UPDATE jobs
    SET locked_by = NULL, locked_at = NULL, last_error = f.error,
        run_at = CASE WHEN f.dead THEN jobs.run_at ELSE now() + f.delay * interval '1 second' END,
        failed_at = CASE WHEN f.dead THEN now() END
    FROM f
    WHERE jobs.id = ANY(%(ids)s::bigint[])
      AND jobs.id = f.id AND jobs.attempts = f.attempts AND jobs.locked_by IS NOT DISTINCT FROM f.worker
    -- A job that died ends the wait of dj.result() callers (dj/results.py): they raise JobDead.
    RETURNING jobs.queue, jobs.batch_id, f.dead, f.seconds,
              CASE WHEN f.dead AND jobs.has_dependents THEN jobs.id END AS dependents_of,
              CASE WHEN f.dead AND jobs.has_dependents THEN f.error END AS dependents_error,
              jobs.limit_key,
              CASE WHEN f.dead THEN pg_notify('""" + RESULTS_CHANNEL + """', jobs.id::text) END AS told
), """ + _stats_from("failed", "failed") + """, batch_progress AS (
    UPDATE batches AS b
    SET dead = b.dead + n.count,
        finished_at = CASE WHEN b.succeeded + b.dead + n.count = b.total THEN now() END
    FROM (SELECT batch_id, count(*)::int AS count FROM failed WHERE dead AND batch_id IS NOT NULL
          GROUP BY batch_id) AS n
    WHERE b.id = n.batch_id
    RETURNING b.*
), """ + _ENQUEUE_BATCH_CALLBACKS + """, settled AS (
    SELECT s.queue
    FROM (SELECT array_agg(dependents_of ORDER BY dependents_of) AS ids,
                 array_agg('dependency job ' || dependents_of || ' is dead: ' || """ + _LAST_LINE.format("dependents_error") + """
                           ORDER BY dependents_of) AS why
          FROM failed WHERE dependents_of IS NOT NULL) AS j,
         (SELECT array_agg(id) AS bad FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents) AS b,
         LATERAL dj_settle_dependents(NULL, NULL, j.ids, j.why, b.bad) AS s(queue)
    WHERE j.ids IS NOT NULL OR b.bad IS NOT NULL
)
SELECT queue, pg_notify('""" + NOTIFY_CHANNEL + """', queue)
FROM (SELECT queue FROM callbacks UNION SELECT queue FROM settled
      UNION SELECT queue FROM failed WHERE limit_key IS NOT NULL) AS wake
"""

# Closing a batch fixes its total. If its jobs have all finished already, this is the statement
# that enqueues the callback (see COMPLETE for why it happens exactly once).
CLOSE_BATCH = """
WITH batch_progress AS (
    UPDATE batches AS b
    SET total = %(total)s,
        finished_at = CASE WHEN b.succeeded + b.dead = %(total)s THEN now() END
    WHERE b.id = %(id)s
    RETURNING b.*
), """ + _ENQUEUE_BATCH_CALLBACKS + """, settled AS (
    SELECT queue FROM dj_settle_dependents(NULL,
        ARRAY(SELECT id FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents AND dead = 0),
        NULL, NULL,
        ARRAY(SELECT id FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents AND dead > 0)) AS queue
    WHERE EXISTS (SELECT FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents)
)
SELECT queue, pg_notify('""" + NOTIFY_CHANNEL + """', queue)
FROM (SELECT queue FROM callbacks UNION SELECT queue FROM settled) AS wake
"""

# Cancelling deletes a job that is not running. A live job of a batch counts towards it as dead,
# so that its batch still completes (a dead job was counted when it died). The jobs waiting for a
# live cancelled job die (a dead one's died with it); a cancelled waiting job's own dependency rows go.
CANCEL = """
WITH cancelled AS (
    DELETE FROM jobs WHERE id = %(id)s AND locked_by IS NULL
    -- dj.result() on it stops waiting at once (and finds no such job).
    RETURNING id, batch_id, failed_at IS NULL AS live, has_dependents,
              pg_notify('""" + RESULTS_CHANNEL + """', id::text) AS told
), unlinked AS (
    DELETE FROM job_dependencies WHERE job_id = %(id)s AND EXISTS (SELECT FROM cancelled)
), batch_progress AS (
    UPDATE batches AS b
    SET dead = b.dead + 1,
        finished_at = CASE WHEN b.succeeded + b.dead + 1 = b.total THEN now() END
    FROM cancelled AS c
    WHERE b.id = c.batch_id AND c.live
    RETURNING b.*
), """ + _ENQUEUE_BATCH_CALLBACKS + """, settled AS (
    SELECT queue FROM dj_settle_dependents(NULL, NULL,
        ARRAY(SELECT id FROM cancelled WHERE live AND has_dependents),
        ARRAY(SELECT 'dependency job ' || id || ' was cancelled' FROM cancelled WHERE live AND has_dependents),
        ARRAY(SELECT id FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents)) AS queue
    WHERE EXISTS (SELECT FROM cancelled WHERE live AND has_dependents)
       OR EXISTS (SELECT FROM batch_progress WHERE finished_at IS NOT NULL AND has_dependents)
), woken AS (
    SELECT pg_notify('""" + NOTIFY_CHANNEL + """', queue) FROM (SELECT queue FROM callbacks UNION SELECT queue FROM settled) AS q
)
SELECT (SELECT count(*) FROM cancelled), (SELECT count(*) FROM woken)
"""

OPEN_BATCH = """
INSERT INTO batches (on_complete, args, kwargs, queue, description)
VALUES (%s, %s::jsonb, %s::jsonb, %s, %s)
RETURNING id
"""

# Progress reported by a running job; fenced like a completion, so a stale worker cannot write.
PROGRESS = """
UPDATE jobs SET progress = jsonb_build_object('fraction', %s::float8, 'message', %s::text, 'at', now())
WHERE id = %s AND attempts = %s AND locked_by = %s
"""

# Hand back claimed jobs. Jobs that never started get their attempt back; started ones keep it.
RELEASE = """
WITH r AS MATERIALIZED (  -- the fence: see COMPLETE
    SELECT r.*, %(worker)s::text AS worker
    FROM unnest(%(ids)s::bigint[], %(attempts)s::int[], %(started)s::bool[]) AS r(id, attempts, started)
)
UPDATE jobs
SET locked_by = NULL, locked_at = NULL,
    attempts = jobs.attempts - CASE WHEN r.started THEN 0 ELSE 1 END
FROM r
WHERE jobs.id = ANY(%(ids)s::bigint[])
  AND jobs.id = r.id AND jobs.attempts = r.attempts AND jobs.locked_by IS NOT DISTINCT FROM r.worker
"""

# After a lost connection a worker cannot tell whether its last claim committed. Rows locked under
# its name that it does not hold were claimed by a round trip whose answer never arrived: they
# never started, so they go back with the attempt undone.
RELEASE_UNKNOWN = """
UPDATE jobs
SET locked_by = NULL, locked_at = NULL, attempts = jobs.attempts - 1
WHERE jobs.locked_by = %(worker)s AND jobs.id <> ALL(%(held)s::bigint[])
"""

# --- workers -------------------------------------------------------------------------------------

REGISTER_WORKER = """
INSERT INTO workers (name, host, pid, queues, concurrency, running, started_at, heartbeat_at)
VALUES (%(name)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, 0, now(), now())
ON CONFLICT (name) DO UPDATE
SET host = EXCLUDED.host, pid = EXCLUDED.pid, queues = EXCLUDED.queues,
    concurrency = EXCLUDED.concurrency, running = 0, started_at = now(), heartbeat_at = now()
"""

# A new worker holds nothing yet, so any row still locked under its name was left by an earlier
# process with the same host and pid that died. That attempt counts, as a crash.
# A job that dies here kills its dependents (see COMPLETE).
CLEAR_OWN_LOCKS = """
WITH cleared AS (
    UPDATE jobs
    SET locked_by = NULL, locked_at = NULL,
        last_error = 'worker ' || locked_by || ' died while running attempt ' || attempts,
        failed_at = CASE WHEN attempts >= max_attempts THEN now() END
    WHERE locked_by = %s
    RETURNING id, last_error, failed_at IS NOT NULL AND has_dependents AS kills
), settled AS (
    SELECT queue FROM dj_settle_dependents(NULL, NULL,
        ARRAY(SELECT id FROM cleared WHERE kills ORDER BY id),
        ARRAY(SELECT 'dependency job ' || id || ' is dead: ' || last_error FROM cleared WHERE kills ORDER BY id),
        NULL) AS queue
    WHERE EXISTS (SELECT FROM cleared WHERE kills)
)
SELECT pg_notify('""" + NOTIFY_CHANNEL + """', queue) FROM settled
"""

HEARTBEAT = "UPDATE workers SET heartbeat_at = now(), running = %s WHERE name = %s"

UNREGISTER_WORKER = "DELETE FROM workers WHERE name = %s"

# Crash recovery. A job is orphaned when it has been locked longer than the lock timeout and its
# worker has not heartbeaten within it (or has no row at all). The lost attempt counts, so a job
# that kills its worker every time ends up dead instead of looping forever. Nobody could heartbeat
# while the server was down, so for one lock timeout after a restart no worker counts as gone.
# A job that dies here kills its dependents (see COMPLETE); their queues come back too, to be woken.
REAP_ORPHANS = """
WITH reaped AS (
UPDATE jobs
SET locked_by = NULL, locked_at = NULL,
    last_error = 'worker ' || jobs.locked_by || ' stopped heartbeating during attempt ' || jobs.attempts,
    failed_at = CASE WHEN jobs.attempts >= jobs.max_attempts THEN now() END
WHERE jobs.locked_by IS NOT NULL
  AND jobs.locked_at < now() - %(lock_timeout)s * interval '1 second'
  AND pg_postmaster_start_time() < now() - %(lock_timeout)s * interval '1 second'
  AND NOT EXISTS (
      SELECT 1 FROM workers w
      WHERE w.name = jobs.locked_by
        AND w.heartbeat_at >= now() - %(lock_timeout)s * interval '1 second')
RETURNING jobs.id, jobs.queue, jobs.last_error, jobs.failed_at IS NOT NULL AND jobs.has_dependents AS kills,
          -- A death ends the waits of dj.result() on it (dj/results.py), as FAIL's do.
          CASE WHEN jobs.failed_at IS NOT NULL THEN pg_notify('""" + RESULTS_CHANNEL + """', jobs.id::text) END AS told
), settled AS (
    SELECT queue FROM dj_settle_dependents(NULL, NULL,
        ARRAY(SELECT id FROM reaped WHERE kills ORDER BY id),
        ARRAY(SELECT 'dependency job ' || id || ' is dead: ' || last_error FROM reaped WHERE kills ORDER BY id),
        NULL) AS queue
    WHERE EXISTS (SELECT FROM reaped WHERE kills)
)
SELECT id, queue FROM reaped
UNION ALL
SELECT NULL, queue FROM settled
"""

FORGET_STALE_WORKERS = """
DELETE FROM workers WHERE heartbeat_at < now() - %(lock_timeout)s * interval '1 second'
"""

PRUNE_STATS = "DELETE FROM job_stats WHERE bucket < now() - interval '1 day'"

# The rate log of keys no claim prunes any more (a rate turned off, a task gone): no period is longer
# than an hour, so older rows count in no window.
PRUNE_RATE_STARTS = "DELETE FROM rate_starts WHERE started_at < now() - interval '1 hour 1 minute'"

# --- vacuum --------------------------------------------------------------------------------------
# Every job leaves two dead row versions in jobs (the claim's update and the success's delete) and
# dead entries in each index. Autovacuum visits a database once per autovacuum_naptime (1 min on a
# stock server) or never (autovacuum off), and at tens of thousands of jobs a second the dead rows
# in between make the heap grow and every claim walk dead index entries. So workers vacuum jobs
# themselves (dj/vacuum.py), one at a time, elected through the 'vacuum jobs' row of maintenance.

# Take the chore if it is due and nobody holds it. One statement, so two workers cannot both take
# it: the second waits for the first's row lock, re-reads the row and finds the lease taken.
# Due means: pg_stat counts at least %(min_dead)s + %(scale)s x live rows dead rows more than the
# last run left (those it had to leave for an old snapshot do not count again), and no snapshot in
# this database is older than the last run's start: such a snapshot still needs every row that run
# left, so a new run would read the whole table and free nothing. A lease, not a session advisory
# lock: behind a transaction pooler a session lock belongs to whoever gets the connection next.
TAKE_VACUUM_LEASE = """
UPDATE maintenance AS m
SET holder = %(worker)s, lease_until = now() + %(lease)s * interval '1 second', started_at = now()
FROM (SELECT n_dead_tup, n_live_tup FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass) AS s
WHERE m.name = 'vacuum jobs' AND m.lease_until < now()
  AND s.n_dead_tup >= m.dead_after + %(min_dead)s + %(scale)s * s.n_live_tup
  AND NOT EXISTS (
      SELECT FROM pg_stat_activity AS a
      WHERE a.datname = current_database() AND a.backend_type = 'client backend'
        AND a.backend_xmin IS NOT NULL AND a.xact_start < m.started_at)
RETURNING s.n_dead_tup
"""

# The chore's row, for a database whose rows were emptied (tests truncate every table): taken once
# by each worker as it starts.
ENSURE_VACUUM_ROW = "INSERT INTO maintenance (name) VALUES ('vacuum jobs') ON CONFLICT (name) DO NOTHING"

# Plain VACUUM: it takes no lock that stops claims or completions. It cannot run in a transaction
# block, so it goes alone on an autocommit connection (which a transaction pooler also passes).
# SKIP_LOCKED: if autovacuum (or someone) is vacuuming jobs already, return at once instead of
# waiting behind it with the lease held. It truncates the heap's empty tail, under a brief ACCESS
# EXCLUSIVE lock, and the next enqueue extends it again: TRUNCATE false was tried and left the table
# at twice the peak size in a 1M-job soak (121 MB against 64), for no faster rounds.
VACUUM_JOBS = "VACUUM (SKIP_LOCKED) jobs"

# Hand the chore back. dead_after: what pg_stat counts as dead now, which right after a vacuum is
# the rows it had to leave because a snapshot still needs them.
END_VACUUM_LEASE = """
UPDATE maintenance
SET lease_until = now(), finished_at = now(), seconds = %(seconds)s, runs = runs + 1,
    dead_after = coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'jobs'::regclass), 0)
WHERE name = 'vacuum jobs' AND holder = %(worker)s
"""

# The vacuum failed (the connection, a cancel): give the lease back so another worker can try.
DROP_VACUUM_LEASE = """
UPDATE maintenance SET lease_until = now() WHERE name = 'vacuum jobs' AND holder = %(worker)s
"""

# --- results: reading and pruning kept successes (dj/results.py, dj/pruning.py) ----------------

# Where a job stands for dj.result(): kept (with its value), or still in jobs (dead, or not ended
# yet, and whether it is kept when it succeeds), or neither (unknown, pruned, or a success that was
# not kept). Both reads are primary-key probes.
RESULT_OF = """
SELECT 'kept', result::text, result_error FROM job_results WHERE id = %(id)s
UNION ALL
SELECT CASE WHEN failed_at IS NOT NULL THEN 'dead' WHEN keep IS NULL THEN 'not kept' ELSE 'pending' END,
       NULL, last_error
FROM jobs WHERE id = %(id)s
"""

# Take the pruning chore if some kept row has expired and nobody holds it: one statement, as
# TAKE_VACUUM_LEASE and for the same reasons. The EXISTS is one probe of job_results_expires_idx.
TAKE_PRUNE_LEASE = """
UPDATE maintenance
SET holder = %(worker)s, lease_until = now() + %(lease)s * interval '1 second', started_at = now()
WHERE name = 'prune results' AND lease_until < now()
  AND EXISTS (SELECT FROM job_results WHERE expires_at <= now())
RETURNING name
"""

ENSURE_PRUNE_ROW = "INSERT INTO maintenance (name) VALUES ('prune results') ON CONFLICT (name) DO NOTHING"

# One small batch of expired rows, oldest expiry first, in a transaction of its own: it locks only
# the rows it deletes (SKIP LOCKED: a row someone is reading for update is left for the next
# batch), so pruning a million rows never holds a lock for long nor blocks a completion, whose
# inserts touch other rows.
PRUNE_RESULTS = """
DELETE FROM job_results
WHERE id = ANY(ARRAY(
    SELECT id FROM job_results WHERE expires_at <= now()
    ORDER BY expires_at LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED))
"""

END_PRUNE_LEASE = """
UPDATE maintenance
SET lease_until = now(), finished_at = now(), seconds = %(seconds)s, runs = runs + 1
WHERE name = 'prune results' AND holder = %(worker)s
"""

DROP_PRUNE_LEASE = """
UPDATE maintenance SET lease_until = now() WHERE name = 'prune results' AND holder = %(worker)s
"""

# --- the oldest snapshot -------------------------------------------------------------------------

# The session in this database whose snapshot holds back vacuum the most: the oldest backend_xmin
# (a snapshot or transaction id that vacuum must still respect), so vacuum keeps every row version
# deleted after it, and every claim still meets the index entries of the jobs drained since (see
# CLAIM). age_s counts from the start of its transaction, which is when a REPEATABLE READ
# report, a pg_dump or an idle-in-transaction connection took it. Sessions of other databases do
# not hold back jobs' vacuum, and the asking session is left out. A role without pg_read_all_stats
# sees no backend_xmin of other roles' sessions.
OLDEST_SNAPSHOT = """
SELECT pid, application_name, state, left(split_part(query, E'\\n', 1), 200),
       greatest(0, extract(epoch FROM clock_timestamp() - coalesce(xact_start, query_start, backend_start)))::float8
FROM pg_stat_activity
WHERE datname = current_database() AND backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
ORDER BY age(backend_xmin) DESC, xact_start
LIMIT 1
"""
