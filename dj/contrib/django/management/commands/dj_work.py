"""`manage.py dj_work [dj work's options]`: `dj work` with this project's settings."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Run dj workers for this project's Django tasks (the options are dj work's; see --help)."

    def run_from_argv(self, argv: list[str]) -> None:
        # dj work parses its own options (Typer); Django's parser would refuse them.
        from dj.cli import main

        sys.argv = ["dj", "work", *argv[2:]]
        main()

    def handle(self, *args: Any, **options: Any) -> None:
        raise CommandError("run it from the command line: manage.py dj_work [dj work's options]")
