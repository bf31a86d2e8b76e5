"""The real install: a wheel built from this checkout, installed into a
virtualenv outside it, used from another directory with no checkout on the
path; bin/runjobs.sh finding its Python; the files of contrib/.

The wheel and its virtualenv are built once per session (a wheel build and
an install of the dependencies: about half a minute).
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import REPO, RUNJOBS_SH, wait_for, write_config

CONTRIB = REPO / "contrib"
SYSTEM_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' leftovers
    return next(out.glob("runjobs-*.whl"))


@pytest.fixture(scope="session")
def venv(tmp_path_factory, wheel) -> Path:
    """A virtualenv outside the checkout with the wheel (and its
    dependencies) installed, as `pip install .` gives."""
    path = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=600)
    return path


def outside_env(tmp_path: Path, db_url: str, path: str) -> dict[str, str]:
    """Nothing of the checkout: no PYTHONPATH, a home of its own, PATH as given."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RUNJOBS_", "PYTHON", "VIRTUAL_ENV"))}
    home = tmp_path / "home"
    env.update(RUNJOBS_HOME=str(home), RUNJOBS_DATABASE_URL=db_url, PATH=path,
               RUNJOBS_CONFIG=str(write_config(home, "")))
    return env


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def cycle_runs_a_job(runjobs: Path, cycle: list[str], env: dict[str, str], cwd: Path) -> None:
    """submit -> one cycle -> show: the job ends SUCCESS."""
    submitted = run([str(runjobs), "submit", "noop"], env, cwd)
    assert submitted.returncode == 0, submitted.stderr
    ran = run(cycle, env, cwd)
    assert ran.returncode == 0, ran.stderr
    shown = run([str(runjobs), "show", submitted.stdout.strip(), "--json"], env, cwd)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "SUCCESS"


@pytest.fixture
def fresh_pg_url(pg_database_url) -> str:
    """An empty PostgreSQL database of its own, dropped afterwards: `db
    upgrade` from the wheel must create the schema."""
    admin = sa.create_engine(pg_database_url, isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    name = f"runjobs_wheel_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield sa.make_url(pg_database_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


# -- the wheel ------------------------------------------------------------------------

def test_the_wheel_holds_the_migrations_and_the_cron_script(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    versions = sorted(p.name for p in (REPO / "migrations" / "versions").glob("0*.py"))
    assert versions and all(f"runjobs/migrations/versions/{v}" in names for v in versions)
    assert {"runjobs/migrations/env.py", "runjobs/migrations/script.py.mako"} <= set(names)
    assert any(n.endswith(".data/scripts/runjobs.sh") for n in names)
    # Every module of the package, sub-packages included (setup.cfg lists
    # them one by one: a new one left out would fail only when imported).
    sources = {str(p.relative_to(REPO)) for p in (REPO / "runjobs").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_an_installed_wheel_runs_a_cycle_on_sqlite_from_any_directory(venv, tmp_path):
    """The embedded default creates its schema from the migrations inside the
    package, with the checkout nowhere on the path."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}", SYSTEM_PATH)
    runjobs = venv / "bin" / "runjobs"
    cycle_runs_a_job(runjobs, [str(runjobs), "run", "--once"], env, elsewhere)
    current = run([str(runjobs), "db", "current"], env, elsewhere)
    assert current.returncode == 0 and "at head" in current.stdout, current.stdout


def test_an_installed_wheel_upgrades_and_runs_postgresql(venv, tmp_path, fresh_pg_url):
    env = outside_env(tmp_path, fresh_pg_url, SYSTEM_PATH)
    runjobs = venv / "bin" / "runjobs"
    before = run([str(runjobs), "db", "current"], env, tmp_path)
    assert before.returncode == 1 and "empty" in before.stdout
    upgraded = run([str(runjobs), "db", "upgrade"], env, tmp_path)
    assert upgraded.returncode == 0 and "empty ->" in upgraded.stdout, upgraded.stderr
    cycle_runs_a_job(runjobs, [str(runjobs), "run", "--once"], env, tmp_path)
    after = run([str(runjobs), "db", "current"], env, tmp_path)
    assert after.returncode == 0 and "at head" in after.stdout


# -- bin/runjobs.sh finds its Python ---------------------------------------------------

def lone_script(tmp_path: Path) -> Path:
    """bin/runjobs.sh copied where no .venv lies beside it."""
    copy = tmp_path / "opt" / "bin" / "runjobs.sh"
    copy.parent.mkdir(parents=True)
    shutil.copy2(RUNJOBS_SH, copy)
    return copy


def test_runjobs_sh_runs_the_virtualenv_first_on_the_callers_path(venv, tmp_path):
    """A virtualenv's bin first on PATH (as an operator or a crontab PATH=
    line sets it): the script runs that environment's Python, not the
    system's."""
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}",
                      f"{venv / 'bin'}:{SYSTEM_PATH}")
    cycle_runs_a_job(venv / "bin" / "runjobs", [str(lone_script(tmp_path)), "--once"], env,
                     tmp_path)


def test_the_installed_runjobs_sh_runs_its_own_virtualenv(venv, tmp_path):
    """pip puts runjobs.sh in the virtualenv's bin/: run by its full path from
    a crontab with a bare PATH, it still finds that environment."""
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}", SYSTEM_PATH)
    cycle_runs_a_job(venv / "bin" / "runjobs", [str(venv / "bin" / "runjobs.sh"), "--once"], env,
                     tmp_path)


def test_runjobs_sh_tries_runjobs_python_first(venv, tmp_path):
    marker = tmp_path / "called"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {marker}\nexec {venv / "bin" / "python"} "$@"\n')
    wrapper.chmod(0o755)
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}", SYSTEM_PATH)
    env["RUNJOBS_PYTHON"] = str(wrapper)
    cycle_runs_a_job(venv / "bin" / "runjobs", [str(venv / "bin" / "runjobs.sh"), "--once"], env,
                     tmp_path)
    assert "-m runjobs run --once" in marker.read_text()


def test_runjobs_sh_appends_crons_directories_after_the_callers(venv, tmp_path):
    """A command action sees the caller's PATH first, then the usual system
    directories (cron's own PATH is minimal)."""
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}",
                      f"{venv / 'bin'}:/bin")
    write_config(tmp_path / "home", '[actions.env]\ncommand = ["/usr/bin/env"]\n')
    runjobs = venv / "bin" / "runjobs"
    job_id = run([str(runjobs), "submit", "env"], env, tmp_path).stdout.strip()
    assert run([str(lone_script(tmp_path)), "--once"], env, tmp_path).returncode == 0
    log = (tmp_path / "home" / "logs" / "jobs" / f"{job_id}.log").read_text()
    path_line = next(line for line in log.splitlines() if line.startswith("PATH="))
    parts = path_line.removeprefix("PATH=").split(":")
    assert parts[:2] == [str(venv / "bin"), "/bin"]
    assert parts[2:] == ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                         "/bin"]


def test_runjobs_sh_says_what_it_tried_when_nothing_imports_runjobs(tmp_path):
    env = outside_env(tmp_path, f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}", SYSTEM_PATH)
    env["RUNJOBS_PYTHON"] = "/bin/false"
    script = lone_script(tmp_path)
    result = run([str(script), "--once"], env, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no Python here can import runjobs" in lines[0]
    for tried in ("/bin/false", f"{script.parent}/../.venv/bin/python", "python3"):
        assert tried in lines[0]
    assert not (tmp_path / "home" / "runjobs.db").exists()


# -- contrib/ -----------------------------------------------------------------------------

def test_logrotate_file_rotates_while_a_runner_keeps_logging(environ, tmp_path):
    """contrib/runjobs.logrotate, run by the real logrotate against a runner
    in the middle of its cycle: the runner goes on writing to the new
    runjobs.log (it reopens a moved log), so no copytruncate is needed."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    log_dir = Path(environ["RUNJOBS_HOME"]) / "logs"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(CONTRIB.joinpath("runjobs.logrotate").read_text()
                    .replace("/var/lib/runjobs/logs", str(log_dir)))
    # A long job keeps `run --once` claiming (and logging) for the whole
    # test, whenever in the minute it starts: a cycle with a deadline could
    # reach it before the job that logs after the rotation is submitted.
    runjobs = [sys.executable, "-m", "runjobs"]
    subprocess.run([*runjobs, "submit", "sleep", "seconds=60"], env=environ, check=True,
                   capture_output=True, timeout=60)
    runner = subprocess.Popen([*runjobs, "run", "--once"], env=environ, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        log = log_dir / "runjobs.log"
        wait_for(lambda: log.exists() and "started on" in log.read_text(), 30, message="runner")
        rotated = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                                 capture_output=True, text=True, timeout=60)
        assert rotated.returncode == 0, rotated.stderr
        assert "started on" in (log_dir / "runjobs.log.1").read_text()
        job_id = subprocess.run([*runjobs, "submit", "fail"], env=environ,
                                capture_output=True, text=True, timeout=60).stdout.strip()
        wait_for(lambda: log.exists() and f"job {job_id} (fail) ended FAILURE" in log.read_text(),
                 30, message="the runner's line in the new log")
        assert os.stat(log).st_mode & 0o777 == 0o600
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=30)


def test_systemd_units_verify_and_start_each_cycle_in_a_transient_unit():
    units = [str(CONTRIB / "runjobs.service"), str(CONTRIB / "runjobs.timer")]
    verified = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(CONTRIB / "runjobs.service")
    exec_start = service["Service"]["ExecStart"].split()
    assert service["Service"]["Type"] == "oneshot"
    # The oneshot only launches the cycle: a long job must not hold up the
    # next minute's timer.
    assert exec_start[0].endswith("systemd-run") and "--collect" in exec_start
    assert "--no-block" in exec_start and exec_start[-1].endswith("/runjobs.sh")
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.read(CONTRIB / "runjobs.timer")
    assert timer["Timer"]["OnCalendar"] == "*-*-* *:*:00"


def test_the_example_defaults_file_sources_as_runjobs_sh_reads_it(tmp_path):
    """contrib/default-runjobs with its examples uncommented is shell that
    runjobs.sh can source (set -a; .), setting what its comments say."""
    examples = [line.removeprefix("#") for line in
                CONTRIB.joinpath("default-runjobs").read_text().splitlines()
                if line.startswith("#") and "=" in line and line[1:2].isupper()]
    defaults = tmp_path / "defaults"
    defaults.write_text("\n".join(examples) + "\n")
    sourced = subprocess.run(
        ["/bin/bash", "-c", 'set -eua; . "$0"; echo "$RUNJOBS_PYTHON $RUNJOBS_DATABASE_URL"',
         str(defaults)], capture_output=True, text=True, timeout=30, env={"PATH": SYSTEM_PATH})
    assert sourced.returncode == 0, sourced.stderr
    python, url = sourced.stdout.split()
    assert python.endswith("/bin/python") and url.startswith("postgresql://")
