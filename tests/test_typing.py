"""Typed tasks: `@job` keeps the function's signature, so a type checker holds every enqueue to it.
mypy runs on two snippets, as on a user's code: it must report exactly the marked lines of one and
nothing in the other."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = Path(__file__).resolve().parent / "typing_snippets"

pytestmark = pytest.mark.no_database


def _marked(path: Path) -> set[tuple[str, int, str]]:
    return {(path.name, n, m.group(1)) for n, line in enumerate(path.read_text().splitlines(), 1)
            if (m := re.search(r"# error: ([a-z-]+)$", line))}


def test_mypy_holds_enqueue_calls_to_the_task_signature():
    wrong, right = SNIPPETS / "wrong_calls.py", SNIPPETS / "right_calls.py"
    # dj from this checkout, its errors silenced as for an installed package: the findings are the
    # snippets' own. Run outside the repository, so that dj's own mypy settings do not apply.
    search_path = os.pathsep.join([str(ROOT), str(SNIPPETS)])  # dj, and typed_tasks beside the snippets
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(Path(tempfile.gettempdir()) / "dj-test-mypy-cache"), str(wrong), str(right)],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env={**os.environ, "MYPYPATH": search_path},
        timeout=240)
    found = {(Path(m.group(1)).name, int(m.group(2)), m.group(3)) for m in
             re.finditer(r"^(\S+\.py):(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.M)}
    expected = _marked(wrong)
    assert len(expected) == 9
    assert found == expected, result.stdout + result.stderr
