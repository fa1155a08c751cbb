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
