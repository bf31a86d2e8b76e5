"""Bad input to submit, list and show: exit 2 (1 for a job that is not
there), one line on stderr naming the bad part, nothing on stdout, and
nothing written: not a job, and on a fresh SQLite home not even the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import cli
from runjobs.models import JobSpec
from runjobs.store import open_store

# (argv, a text the error line must contain)
BAD_INPUT = [
    pytest.param(("submit", "os:system"), "os:system", id="unknown-action"),
    pytest.param(("submit", "tests.import_marker:run"), "tests.import_marker:run",
                 id="unknown-action-module-path"),
    pytest.param(("submit", "noop", "seconds"), "seconds", id="key-without-equals"),
    pytest.param(("submit", "noop", "=5"), "=5", id="empty-key"),
    pytest.param(("submit", "noop", "--params", '{"a": 1'), "--params", id="broken-params-json"),
    pytest.param(("submit", "noop", "--params", "[1, 2]"), "--params", id="params-not-object"),
    pytest.param(("submit", "noop", "hosts:=[a,b]"), "hosts:=[a,b]", id="broken-key-json"),
    pytest.param(("submit", "noop", "--in", "5x"), "5x", id="bad-in-duration"),
    pytest.param(("submit", "noop", "--timeout", "abc"), "abc", id="bad-timeout-duration"),
    pytest.param(("submit", "noop", "--at", "yesterday"), "yesterday", id="bad-at-time"),
    pytest.param(("submit", "noop", "--at", "2030-01-02T03:04:05"), "2030-01-02T03:04:05",
                 id="time-without-zone"),
    pytest.param(("submit", "noop", "--max-start", "soon"), "soon", id="bad-max-start"),
    pytest.param(("submit", "noop", "--needs", "scan"), "scan", id="bad-needs"),
    pytest.param(("submit", "noop", "--retries", "-1"), "--retries", id="negative-retries"),
    pytest.param(("submit", "noop", "--at", "now", "--in", "5m"), "--at", id="at-and-in"),
    pytest.param(("list", "--status", "BOGUS"), "BOGUS", id="unknown-status"),
    pytest.param(("list", "--limit", "0"), "--limit", id="zero-limit"),
    pytest.param(("show", "abc"), "abc", id="show-not-a-number"),
]


def sqlite_file(environ: dict[str, str]) -> Path | None:
    url = environ["RUNJOBS_DATABASE_URL"]
    return Path(sa.make_url(url).database) if url.startswith("sqlite") else None


def job_ids(settings) -> list[int]:
    store = open_store(settings)
    try:
        return [job.id for job in store.jobs_list(limit=1000)]
    finally:
        store.dispose()


def check_rejected(result, code: int, names: str) -> None:
    assert result.returncode == code, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0], lines[0]


@pytest.mark.parametrize("args, names", BAD_INPUT)
def test_bad_input_exits_2_and_writes_nothing(environ, settings, args, names):
    database = sqlite_file(environ)
    if database is not None:
        # A fresh home: parsing and action validation come before the
        # database is opened, so not even the file appears.
        check_rejected(cli(environ, *args), 2, names)
        assert not database.exists(), "bad input created the SQLite file"

    store = open_store(settings)
    try:
        store.jobs_submit([JobSpec("noop")])
    finally:
        store.dispose()
    before = job_ids(settings)
    check_rejected(cli(environ, *args), 2, names)
    assert job_ids(settings) == before


def test_show_missing_job_exits_1(environ, store):
    (existing,) = store.jobs_submit([JobSpec("noop")])
    result = cli(environ, "show", "999")
    check_rejected(result, 1, "999")
    assert "does not exist" in result.stderr
    assert [j.id for j in store.jobs_list()] == [existing.id]


def test_show_missing_job_as_json_exits_1(environ, store):
    check_rejected(cli(environ, "show", "999", "--json"), 1, "999")
    assert store.jobs_list() == []


def test_run_with_a_margin_not_shorter_than_its_period_is_bad_input(environ):
    result = cli(environ, "run", "--once", "--period", "10s", "--margin", "10s")
    assert result.returncode == 2
    assert "margin" in result.stderr and len(result.stderr.strip().splitlines()) == 1
