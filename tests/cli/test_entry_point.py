"""The real entry point, `python -m runjobs`, as a process: a few smoke tests
so that what cron and people run stays covered while the other CLI tests
run in process. And what running in process needs: a lazy context that
`--help` and bad arguments never open, and one closed after each command."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import psutil
import pytest
import sqlalchemy as sa

from conftest import cli, cli_process
from runjobs.config import pg_url


def test_no_arguments_prints_the_help_and_exits_0(environ):
    result = cli_process(environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: runjobs") and "submit" in result.stdout
    assert result.stderr == ""


def test_submit_list_show_cancel_as_processes(environ):
    submitted = cli_process(environ, "submit", "noop", "a=1")
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout)
    listed = cli_process(environ, "list", "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [job_id]
    shown = json.loads(cli_process(environ, "show", str(job_id), "--json").stdout)
    assert shown["params"] == {"a": "1"} and shown["status"] == "PENDING"
    canceled = cli_process(environ, "cancel", str(job_id))
    assert (canceled.returncode, canceled.stdout) == (0, f"job {job_id}: CANCELED\n")
    again = cli_process(environ, "cancel", str(job_id))
    assert again.returncode == 1 and "CANCELED" in again.stderr


def test_bad_input_as_a_process_exits_2_with_one_line(environ):
    result = cli_process(environ, "submit", "noop", "--in", "5x")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("runjobs: error: ") and "5x" in result.stderr
    assert len(result.stderr.splitlines()) == 1


class Untouchable(Mapping):
    """An environment that fails the test when settings are loaded from it."""

    def __getitem__(self, key: str) -> str:
        raise AssertionError(f"settings were loaded (read {key})")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("settings were loaded")

    def __len__(self) -> int:
        raise AssertionError("settings were loaded")


@pytest.mark.parametrize("args, code", [
    (("--help",), 0), (("submit", "--help"), 0), (("db", "upgrade", "--help"), 0),
    ((), 0), (("submit", "noop", "--in", "5x"), 2), (("list", "--status", "BOGUS"), 2),
    (("show", "abc"), 2), (("nosuchcommand",), 2),
])
def test_help_and_bad_arguments_load_no_settings(args, code):
    result = cli(Untouchable(), *args)
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr


def open_connections(db_url: str) -> int:
    """runjobs' connections to the test database: PostgreSQL sessions named
    runjobs, or this process's handles on the SQLite file."""
    if db_url.startswith("sqlite"):
        path = sa.make_url(db_url).database
        return sum(f.path.startswith(path) for f in psutil.Process().open_files())
    engine = sa.create_engine(pg_url(db_url), poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        count = conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'runjobs'"
            " AND datname = current_database()")).scalar()
    engine.dispose()
    return count


def test_each_command_in_process_closes_what_it_opened(environ, db_url):
    assert cli(environ, "db", "upgrade").returncode == 0
    before = open_connections(db_url)
    for _ in range(5):
        job_id = cli(environ, "submit", "noop").stdout.strip()
        assert cli(environ, "show", job_id).returncode == 0
        assert cli(environ, "cancel", job_id, "999").returncode == 1  # its own sys.exit
        assert cli(environ, "db", "current").returncode == 0
    assert open_connections(db_url) == before
