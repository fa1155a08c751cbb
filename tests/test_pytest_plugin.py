"""dj's pytest plugin, as a user meets it: an installed dj, a test file, and no conftest line.

Each test runs pytest in a subprocess (pytester) on a directory that holds only the user's files,
so the plugin can come only from dj's `pytest11` entry point."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_JOBS = '''
from dj import job

SENT = []

@job(name="userapp.send_welcome")
def send_welcome(email):
    SENT.append(email)

def signup(email):
    send_welcome.enqueue(email)
'''

USER_TESTS = '''
import pytest
from userapp import SENT, send_welcome, signup

def test_capture(dj_jobs):
    signup("a@b.c")
    assert [(j.task, j.args) for j in dj_jobs.jobs] == [("userapp.send_welcome", ["a@b.c"])]
    dj_jobs.assert_enqueued(send_welcome, args=["a@b.c"])
    assert SENT == []
    assert dj_jobs.drain() == 1
    assert SENT == ["a@b.c"]

def test_each_test_gets_a_fresh_capture(dj_jobs):
    assert dj_jobs.jobs == []

def test_inline(dj_inline):
    SENT.clear()
    signup("d@e.f")
    assert SENT == ["d@e.f"]
'''


@pytest.mark.no_database
def test_the_user_gets_dj_jobs_and_dj_inline_without_any_conftest_line(pytester, monkeypatch):
    pytester.makepyfile(userapp=USER_JOBS, test_user=USER_TESTS)
    # Nothing may reach a database: none listens where DJ_DATABASE_URL points.
    monkeypatch.setenv("DJ_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nothing")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    assert not list(pytester.path.glob("conftest.py"))


@pytest.mark.no_database
def test_loading_the_plugin_imports_nothing_heavy_and_reads_no_setting():
    """pytest imports the plugin in every run where dj is installed: it must cost those runs
    neither psycopg nor dj's worker, and must not read DJ_* settings before a conftest sets them."""
    probe = ("import os, sys\n"
             "class Spy(dict):\n"
             "    def get(self, key, *default):\n"
             "        if key.startswith('DJ_'): raise AssertionError('read ' + key)\n"
             "        return super().get(key, *default)\n"
             "os.environ = Spy(os.environ)\n"
             "import dj.pytest_plugin\n"
             "print(sorted(m for m in sys.modules if m.startswith(('dj.', 'psycopg', 'sqlalchemy', 'alembic'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['dj.pytest_plugin']"


USER_DB_TESTS = '''
import psycopg
import dj
from userapp import send_welcome

def count(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]

def test_a_job_is_a_row(dj_database):
    assert dj.database_url() == dj_database
    send_welcome.enqueue("a@b.c")
    send_welcome.enqueue("d@e.f")
    assert count(dj_database) == 2

def test_the_next_test_starts_empty(dj_database):
    assert count(dj_database) == 0
    send_welcome.enqueue("g@h.i")
    assert count(dj_database) == 1
    assert dj.Worker(queues=["default"]).run(burst=True).succeeded == 1
    assert count(dj_database) == 0
'''


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "testing"


def test_the_readmes_example_passes_and_dj_database_gives_each_test_an_empty_database(pytester):
    """examples/testing holds README's "Testing your jobs" code: both modes, the integration
    database and dj.testing without fixtures, run as a user would; with it (one run, one database
    created and migrated), tests of dj_database itself. On this suite's server: DJ_DATABASE_URL's,
    or the embedded one."""
    for name in ("shop.py", "test_shop.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    pytester.makepyfile(userapp=USER_JOBS, test_user_db=USER_DB_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


@pytest.mark.no_database
def test_the_readmes_testing_snippets_are_the_examples_code():
    readme = (EXAMPLES.parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Testing your jobs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    sources = [(EXAMPLES / name).read_text(encoding="utf-8") for name in ("shop.py", "test_shop.py")]
    assert len(blocks) >= 2
    for block in blocks:
        assert any(block in source for source in sources), block
