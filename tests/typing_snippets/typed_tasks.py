"""The tasks both snippets call."""

from dj import job


@job
def create_user(marker: int) -> None:
    pass


@job(name="mail.send_welcome", queue="mail")
async def send_welcome(email: str, *, lang: str = "en") -> None:
    pass
