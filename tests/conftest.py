"""Shared fixtures: real databases (a SQLite file, and PostgreSQL when
RUNJOBS_TEST_PG_URL is set), the command line in process (`cli`) and as
a real process (`cli_process`).

Database-facing tests take the `db` fixture, parametrized over both
databases; without RUNJOBS_TEST_PG_URL the PostgreSQL half skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from runjobs.config import Settings, load_settings, pg_url
from runjobs import migrate
from runjobs.cli import Context, run_cli
from runjobs.models import Status
from runjobs.schema import jobs
from runjobs.store import Store, make_engine, open_store

REPO = Path(__file__).resolve().parent.parent
RUNJOBS_SH = REPO / "bin" / "runjobs.sh"
PG_URL = os.environ.get("RUNJOBS_TEST_PG_URL")
TABLES = ("job_events", "jobs", "crons", "runners")


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.05,
             message: str = "condition") -> object:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def pg_database_url() -> str:
    """The PostgreSQL test database, upgraded to head once per session."""
    if not PG_URL:
        if os.environ.get("RUNJOBS_TEST_REQUIRE_PG"):
            pytest.fail("RUNJOBS_TEST_REQUIRE_PG is set but RUNJOBS_TEST_PG_URL is not")
        pytest.skip("RUNJOBS_TEST_PG_URL is not set")
    url = pg_url(PG_URL)
    settings = load_settings({"RUNJOBS_HOME": "/nonexistent"}, database_url=url)
    store = Store(make_engine(settings), settings)
    migrate.upgrade(store)
    store.dispose()
    return url


def truncate_pg(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A database URL, empty of jobs: a fresh SQLite file, or the
    PostgreSQL test database truncated."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}"
    url = request.getfixturevalue("pg_database_url")
    truncate_pg(url)
    return url


@pytest.fixture
def environ(tmp_path, db_url) -> dict[str, str]:
    """Environment for runjobs processes: own home, the test database."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNJOBS_")}
    env.update(RUNJOBS_HOME=str(home), RUNJOBS_DATABASE_URL=db_url,
               RUNJOBS_CONFIG=str(write_config(home, "")),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def write_config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / "runjobs.toml"
    path.write_text(text)
    return path


@pytest.fixture
def settings(environ) -> Settings:
    return load_settings(environ)


@pytest.fixture
def store(settings) -> Store:
    store = open_store(settings)
    yield store
    store.dispose()


@dataclass
class CliResult:
    """What `cli` returns: the fields of subprocess.CompletedProcess that tests read."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def runjobs_cmd(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "runjobs", *args]


# While a command runs in process, the real environment's RUNJOBS_* name
# nothing usable: a command that read os.environ instead of the environ it
# was given fails (exit 2, naming the variable) instead of passing by luck.
_NOT_THE_REAL_ENVIRON = "/runjobs-read-the-real-os.environ-in-process"
_POISONED_ENVIRON = {name: _NOT_THE_REAL_ENVIRON
                     for name in ("RUNJOBS_HOME", "RUNJOBS_CONFIG", "RUNJOBS_DATABASE_URL")}


def cli(environ: dict[str, str], *args: str, input: str | None = None) -> CliResult:
    """Run `runjobs ARGS` in this process: the path `main()` takes, on a
    context loading its settings from `environ`, with stdin, stdout and
    stderr captured by click's CliRunner. `run` and bytes in argv need a
    real process: `cli_process`."""
    if args and args[0] == "run":
        raise ValueError("`runjobs run` starts runners, signals, logging: use cli_process")
    if any(isinstance(arg, bytes) for arg in args):
        raise ValueError("bytes in argv are decoded by a real interpreter: use cli_process")
    runner = CliRunner()
    with runner.isolation(input=input, env=_POISONED_ENVIRON) as (stdout, stderr, _):
        code = run_cli(list(args), obj=Context(environ=environ))
        sys.stdout.flush()
        sys.stderr.flush()
    return CliResult(["runjobs", *args], code, stdout.getvalue().decode("utf-8", "replace"),
                     stderr.getvalue().decode("utf-8", "replace"))


def cli_process(environ: dict[str, str], *args: str | bytes, input: str | None = None,
                timeout: float = 60, cwd: str | Path | None = None
                ) -> subprocess.CompletedProcess:
    """Run `runjobs ARGS` as a real process (`python -m runjobs`)."""
    return subprocess.run(runjobs_cmd(*args), env=environ, input=input, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def submit_job(environ: dict[str, str], *args: str) -> int:
    """`runjobs submit ARGS` as a process; its id."""
    result = cli_process(environ, "submit", *args)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def show_job(environ: dict[str, str], job_id: int) -> dict:
    """`runjobs show ID --json` as a process."""
    import json

    result = cli_process(environ, "show", str(job_id), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def is_postgres(store: Store) -> bool:
    """For tests whose SQL (EXPLAIN, catalogue queries) differs by database."""
    return store.dialect.name == "postgresql"


def queue_directly(store: Store, runner_id: int, ids: list[int], node: str) -> None:
    """Leave the PENDING jobs `ids` QUEUED under `runner_id` on `node` by
    writing their rows, as a runner stopped between its claim and its start
    left them (a crash, a start whose answer was lost, an older runjobs).
    The runner's round claims and starts in one statement, so no store call
    leaves a job QUEUED; tests of what becomes of one write the state
    directly (STYLE 8). The event trigger records the claim as usual."""
    now = store.db_now()
    with store.engine.begin() as conn:
        queued = conn.execute(
            sa.update(jobs).where(jobs.c.id.in_(ids), jobs.c.status == Status.PENDING.value)
            .values(status=Status.QUEUED.value, runner_id=runner_id, node=node,
                    queued_at=now, updated_at=now)).rowcount
    assert queued == len(ids), f"not all of {ids} were PENDING"
