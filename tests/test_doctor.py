"""`dj doctor` against the real server: every check is reported, a snapshot held open in the test
is a WARN naming its session, and the exit code says 0 all OK, 1 a warning, 2 cannot check."""

from __future__ import annotations

import json
import time

import psycopg

from dj import doctor

NAMES = ["server version", "pooler", "autovacuum", "jobs table", "oldest snapshot", "connections", "schema"]


def test_every_check_is_reported_and_the_exit_code_follows_the_status(cli, db_url):
    result = cli("doctor", "--json")
    doc = json.loads(result.stdout)
    assert [c["name"] for c in doc["checks"]] == NAMES
    assert all(c["status"] in ("OK", "WARN") for c in doc["checks"])
    assert all(c["fix"] for c in doc["checks"] if c["status"] == "WARN")  # every warning says what to do
    assert doc["status"] == ("warn" if any(c["status"] == "WARN" for c in doc["checks"]) else "ok")
    assert result.returncode == (1 if doc["status"] == "warn" else 0), result.stderr
    by_name = {c["name"]: c for c in doc["checks"]}
    assert by_name["schema"]["status"] == "OK"  # the test database is migrated
    assert by_name["pooler"]["data"]["mode"] == "direct"

    text = cli("doctor")
    assert text.returncode == result.returncode
    lines = text.stdout.strip().splitlines()
    assert len(lines) == len(NAMES)
    assert all(line.split()[0] in ("OK", "WARN") for line in lines)


def test_a_snapshot_held_open_is_a_warning_with_its_session(cli, db_url):
    with psycopg.connect(db_url, application_name="doctor-test-report") as holder:
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT count(*) FROM jobs").fetchone()  # takes the snapshot
        time.sleep(1.2)
        result = cli("doctor", "--json", env={"DJ_SNAPSHOT_WARN_AFTER": "1"})
        pid = holder.info.backend_pid
    assert result.returncode == 1, result.stderr
    check = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["oldest snapshot"]
    assert check["status"] == "WARN"
    assert check["data"]["pid"] == pid
    assert check["data"]["application_name"] == "doctor-test-report"
    assert check["data"]["state"] == "idle in transaction"
    assert check["data"]["age_s"] >= 1
    assert str(pid) in check["fix"]

    # once it has ended, the same check is OK again
    after = {c.name: c for c in doctor.run(db_url).checks}["oldest snapshot"]
    assert after.status == "OK"


def test_a_schema_behind_the_code_is_a_warning(conn, db_url):
    head = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    conn.execute("UPDATE alembic_version SET version_num = '0007_jobs_page_room'")
    try:
        report = doctor.run(db_url)
    finally:
        conn.execute("UPDATE alembic_version SET version_num = %s", (head,))
    check = {c.name: c for c in report.checks}["schema"]
    assert check.status == "WARN" and "dj migrate" in check.fix
    assert report.status == "warn"


def test_an_unreachable_server_is_one_error_line_and_exit_2(cli):
    result = cli("doctor", "--database-url", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "secret" not in result.stderr
