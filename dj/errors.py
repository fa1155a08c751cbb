"""Exceptions that users of dj see."""


class DJError(Exception):
    """Bad input or an unusable environment. The CLI prints it as one line and exits 2."""


class WorkFailed(Exception):
    """The command ran but its work did not succeed. The CLI prints it as one line and exits 1."""


class WorkerStuck(WorkFailed):
    """Every runner thread of a worker is stuck in a job far past its timeout. The worker hands back
    its other jobs and stops, so that a fresh process (the supervisor starts one) takes over."""


class DatabaseUnavailable(DJError):
    pass


class SchemaMissing(DJError):
    def __init__(self, url: str):
        super().__init__(f"database {url} has no dj schema; run 'dj migrate'")


class Permanent(Exception):
    """Raise from a job to make it dead at once, skipping the remaining retries."""


class JobDead(Exception):
    """dj.result(): the job is dead (its attempts ran out, or it raised dj.Permanent). `error` is its
    last error, as `dj jobs show` prints it."""

    def __init__(self, job_id: int, error: str | None):
        self.job_id, self.error = job_id, error
        lines = (error or "").strip().splitlines()
        super().__init__(f"job {job_id} is dead: {lines[-1] if lines else 'no error recorded'}")


class ResultNotKept(LookupError):
    """dj.result() on a job enqueued without keep=: its success deletes it, value and all, so there
    is nothing to wait for. Raised at once, while the job is still in the queue."""


class ResultError(Exception):
    """dj.result(): the job succeeded, but its return value could not be kept (not JSON-serialisable,
    or over the size limit); the message says why."""
