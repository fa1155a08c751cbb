"""Job dependencies: a job that runs once the jobs and batches it waits for have succeeded

Revision ID: 0009_dependencies
Revises: 0008_maintenance
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_dependencies"
down_revision = "0008_maintenance"
branch_labels = None
depends_on = None

# Called by COMPLETE, FAIL, CANCEL, REAP_ORPHANS and CLEAR_OWN_LOCKS (dj/sql.py) when a job or a
# batch that has dependents has finished: releases the dependents whose last dependency succeeded,
# and kills (down the chain) those whose dependency died or was cancelled. Returns the queues to
# wake: those of released dependents and of batch callbacks enqueued because a killed dependent
# finished its batch.
#
# Why a function, and why VOLATILE: it must see dependency rows committed after the calling
# statement took its snapshot. An enqueue with after=[A] flags A (jobs.has_dependents) with an
# UPDATE; a COMPLETE that started before that enqueue committed waits for A's row lock, then
# re-reads A and sees the flag, but its own snapshot cannot see the enqueue's job_dependencies
# rows nor the dependent's row. A VOLATILE function takes a fresh snapshot for each statement it
# runs, so it sees them. (See docs/ARCHITECTURE.md, "Dependencies".)
#
# Two dependencies of one job finishing in two transactions at once: each locks the dependents
# first (in id order, so they cannot deadlock on them), so the second waits for the first to
# commit, and its next statement, with a fresh snapshot, sees the first's deletions; exactly one
# of them sees no dependency left and releases the job.
SETTLE = r"""
CREATE FUNCTION dj_settle_dependents(done_jobs bigint[], done_batches bigint[],
                                     dead_jobs bigint[], dead_why text[], dead_batches bigint[])
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    touched bigint[];
    dead_batch_why text[];
    killed bigint[];
    killed_why text[];
    finished bigint[];
    callback_queues text[];
BEGIN
    done_jobs := coalesce(done_jobs, '{}');
    done_batches := coalesce(done_batches, '{}');
    dead_jobs := coalesce(dead_jobs, '{}');
    dead_why := coalesce(dead_why, '{}');
    dead_batches := coalesce(dead_batches, '{}');

    -- Successes: drop the satisfied dependency rows, and release the dependents left with none.
    IF cardinality(done_jobs) + cardinality(done_batches) > 0 THEN
        PERFORM 1 FROM jobs
        WHERE id IN (SELECT job_id FROM job_dependencies WHERE after_job = ANY(done_jobs)
                     UNION SELECT job_id FROM job_dependencies WHERE after_batch = ANY(done_batches))
        ORDER BY id FOR UPDATE;
        WITH gone AS (
            DELETE FROM job_dependencies WHERE after_job = ANY(done_jobs) OR after_batch = ANY(done_batches)
            RETURNING job_id
        )
        SELECT array_agg(DISTINCT job_id) INTO touched FROM gone;
        -- A new statement, so a fresh snapshot: it sees the deletions just made and those of
        -- transactions that committed while this one waited for the locks above.
        RETURN QUERY
        UPDATE jobs SET run_at = now()
        WHERE id = ANY(touched) AND run_at = 'infinity' AND failed_at IS NULL AND locked_by IS NULL
          AND NOT EXISTS (SELECT FROM job_dependencies x WHERE x.job_id = jobs.id)
        RETURNING queue;
    END IF;

    -- Deaths: each dependent dies naming its first dead dependency; then its own dependents, and
    -- so on down the chain. A dead dependent counts towards its batch like any dead job, and a
    -- batch it finishes gets its callback, and kills that batch's dependents in the next round.
    dead_batch_why := ARRAY(SELECT 'dependency batch ' || b || ' finished with dead or cancelled jobs'
                            FROM unnest(dead_batches) AS b);
    WHILE cardinality(dead_jobs) + cardinality(dead_batches) > 0 LOOP
        PERFORM 1 FROM jobs
        WHERE id IN (SELECT job_id FROM job_dependencies WHERE after_job = ANY(dead_jobs)
                     UNION SELECT job_id FROM job_dependencies WHERE after_batch = ANY(dead_batches))
        ORDER BY id FOR UPDATE;
        WITH causes AS (
            SELECT x.job_id, 0 AS kind, c.id, c.why
            FROM job_dependencies x JOIN unnest(dead_jobs, dead_why) AS c(id, why) ON x.after_job = c.id
            UNION ALL
            SELECT x.job_id, 1, c.id, c.why
            FROM job_dependencies x JOIN unnest(dead_batches, dead_batch_why) AS c(id, why) ON x.after_batch = c.id
        ), cause AS (
            SELECT DISTINCT ON (job_id) job_id, why FROM causes ORDER BY job_id, kind, id
        ), cleared AS (
            DELETE FROM job_dependencies x USING cause WHERE x.job_id = cause.job_id
        ), killed AS (
            UPDATE jobs SET failed_at = now(), run_at = now(), last_error = left(cause.why, 4000)
            FROM cause
            WHERE jobs.id = cause.job_id AND jobs.failed_at IS NULL AND jobs.locked_by IS NULL
            RETURNING jobs.id, jobs.batch_id, jobs.last_error
        ), batch_progress AS (
            UPDATE batches AS b
            SET dead = b.dead + n.count,
                finished_at = CASE WHEN b.succeeded + b.dead + n.count = b.total THEN now() END
            FROM (SELECT batch_id, count(*)::int AS count FROM killed WHERE batch_id IS NOT NULL
                  GROUP BY batch_id) AS n
            WHERE b.id = n.batch_id
            RETURNING b.*
        ), callbacks AS (
            INSERT INTO jobs (queue, task, args, kwargs)
            SELECT queue, on_complete, args, kwargs || jsonb_build_object('batch', jsonb_build_object(
                       'id', id, 'total', total, 'succeeded', succeeded, 'dead', dead))
            FROM batch_progress WHERE finished_at IS NOT NULL AND on_complete IS NOT NULL
            RETURNING queue
        )
        SELECT (SELECT array_agg(id ORDER BY id) FROM killed),
               (SELECT array_agg('dependency job ' || id || ' is dead: ' || last_error ORDER BY id) FROM killed),
               (SELECT array_agg(id ORDER BY id) FROM batch_progress
                WHERE finished_at IS NOT NULL AND has_dependents),
               (SELECT array_agg(queue) FROM callbacks)
        INTO killed, killed_why, finished, callback_queues;
        RETURN QUERY SELECT unnest(coalesce(callback_queues, '{}'));
        dead_jobs := coalesce(killed, '{}');
        dead_why := coalesce(killed_why, '{}');
        dead_batches := coalesce(finished, '{}');
        dead_batch_why := ARRAY(SELECT 'dependency batch ' || b || ' finished with dead or cancelled jobs'
                                FROM unnest(dead_batches) AS b);
    END LOOP;
END
$fn$
"""


def upgrade() -> None:
    # One row per (dependent, dependency): the dependency is a job or a batch. Rows go as their
    # dependencies succeed; a dependent with none left is released.
    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("after_job", sa.BigInteger),
        sa.Column("after_batch", sa.BigInteger),
        sa.CheckConstraint("(after_job IS NULL) <> (after_batch IS NULL)", name="job_dependencies_one_target"),
    )
    # Found by the dependency when it finishes (dj_settle_dependents), by the dependent for
    # `dj jobs show` and cancel.
    op.create_index("job_dependencies_after_job_idx", "job_dependencies", ["after_job"],
                    postgresql_where=sa.text("after_job IS NOT NULL"))
    op.create_index("job_dependencies_after_batch_idx", "job_dependencies", ["after_batch"],
                    postgresql_where=sa.text("after_batch IS NOT NULL"))
    op.create_index("job_dependencies_job_idx", "job_dependencies", ["job_id"])
    # Set (by an UPDATE, which is also the lock that orders it against the finish: see SETTLE) on a
    # job or batch once something waits for it. NULL otherwise, so a job without dependents costs
    # COMPLETE and FAIL nothing but reading the flag. No default: adding the columns rewrites nothing.
    op.add_column("jobs", sa.Column("has_dependents", sa.Boolean))
    op.add_column("batches", sa.Column("has_dependents", sa.Boolean))
    op.execute(SETTLE)


def downgrade() -> None:
    op.execute("DROP FUNCTION dj_settle_dependents(bigint[], bigint[], bigint[], text[], bigint[])")
    op.drop_column("batches", "has_dependents")
    op.drop_column("jobs", "has_dependents")
    op.drop_table("job_dependencies")
