"""The chaos run, short: 3,000 jobs on 4 worker processes x 8 threads, 1% failing on purpose, a
worker killed with SIGKILL every ~2 s and one PostgreSQL restart (of a throwaway server). Nothing is
lost, and every job that ran twice had its earlier run in a killed process. The long run is
`python -m dj.chaos` (100,000 jobs by default)."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_a_short_chaos_run_loses_nothing():
    result = subprocess.run([sys.executable, "-m", "dj.chaos", "--jobs", "3000", "--minutes", "3", "--job-ms", "100",
                             "--kill-every", "2", "--seed", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    table = result.stdout
    assert result.returncode == 0, table + result.stderr[-3000:]
    numbers = {name.strip(): int(value) for name, value in re.findall(r"^([a-z ]+?)\s+(\d+)", table, re.M)}
    assert numbers["enqueued"] == 3000 and numbers["lost"] == 0 and numbers["tracebacks logged"] == 0
    assert numbers["succeeded"] + numbers["dead"] == 3000
    assert numbers["kills made"] >= 3 and numbers["database restarts"] == 1
    assert re.search(r"ran more than once\s+(\d+)\s+\(\1 after a kill, 0 unexplained\)", table), table
