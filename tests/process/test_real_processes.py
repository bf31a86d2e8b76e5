"""Real processes: bin/runjobs.sh and `python -m runjobs run` started as
subprocesses against a real SQLite file and a real PostgreSQL database.

Every process gets a timeout and is killed in a `finally`; time-dependent
tests use short cycles (--period, --margin) and wait with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from runjobs.models import JobSpec, Status
from runjobs.store import Store
from tests.conftest import RUNJOBS_SH, runjobs_cmd, wait_for, write_config

PROCESS_TIMEOUT = 60.0


# -- helpers -----------------------------------------------------------------------

def home_of(environ: dict[str, str]) -> Path:
    return Path(environ["RUNJOBS_HOME"])


def configure(environ: dict[str, str], toml_text: str) -> None:
    """Write the config file that the runner processes read."""
    write_config(home_of(environ), toml_text)


def submit(store: Store, *specs: JobSpec) -> list[int]:
    return [s.id for s in store.jobs_submit(list(specs))]


def run_sh(environ: dict[str, str], *args: str, cwd: str | Path | None = None,
           timeout: float = PROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """bin/runjobs.sh ARGS to completion; subprocess.run kills it on timeout."""
    return subprocess.run([str(RUNJOBS_SH), *args], env=environ, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def started(argv: list[str], environ: dict[str, str], **popen_args) -> Iterator[subprocess.Popen]:
    """A background process in its own group, killed on the way out."""
    proc = subprocess.Popen(argv, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **popen_args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def finished(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def expected_deadline(now: float, period: float, margin: float) -> float:
    """The contract's deadline, computed here independently of runjobs."""
    boundary = (int(now // period) + 1) * period
    deadline = boundary - margin
    return deadline + period if now >= deadline else deadline


def statuses(store: Store, ids: list[int]) -> list[Status]:
    return [store.job_status(i) for i in ids]


# -- 1. any working directory; each job exactly once ----------------------------------

def test_runjobs_sh_once_from_another_directory_runs_each_job_once(environ, store, tmp_path):
    """No PYTHONPATH: the script finds a Python that imports runjobs by
    itself (the checkout's .venv here). The jobs are commands, so nothing of
    the tests needs to be importable."""
    configure(environ, '[actions.append]\ncommand = ["/bin/sh", "-c", "echo $0 >> $1", '
                       '"{n}", "{path}"]\n')
    out = tmp_path / "ids.txt"
    ids = submit(store, *[JobSpec("append", {"n": n, "path": str(out)}) for n in range(50)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(environ)
    env.pop("PYTHONPATH")

    result = run_sh(env, "--once", cwd=elsewhere)

    assert result.returncode == 0, result.stderr
    lines = out.read_text().split()
    assert sorted(int(x) for x in lines) == list(range(50))  # every job, none twice
    assert set(statuses(store, ids)) == {Status.SUCCESS}


# -- 2. priority order ----------------------------------------------------------------

def test_capacity_one_starts_jobs_in_priority_then_id_order(environ, store, tmp_path):
    configure(environ, 'capacity = {default = 1}\n'
                       '[actions.record]\ncallable = "tests.sample_actions:record_start"\n')
    out = tmp_path / "starts.txt"
    priorities = [0, 5, 0, 10, 5, -1]
    ids = []
    for priority in priorities:  # one transaction each: run_at never decreases with id
        ids += submit(store, JobSpec("record", {"path": str(out), "seconds": 0.05},
                                     priority=priority))

    result = run_sh(environ, "--once")

    assert result.returncode == 0, result.stderr
    started_ids = [int(line.split()[0]) for line in out.read_text().splitlines()]
    by_priority = dict(zip(ids, priorities))
    assert started_ids == sorted(ids, key=lambda i: (-by_priority[i], i))
    assert started_ids != ids  # the test means something only if the orders differ
    assert set(statuses(store, ids)) == {Status.SUCCESS}


# -- 3. the cycle's deadline, and the lock --------------------------------------------

def test_idle_runner_exits_at_its_deadline_and_a_second_one_yields(environ):
    period, margin = 10, 2
    now = time.time()
    if expected_deadline(now, period, margin) - now < 3:
        # Too close to call (process start-up takes a moment), and the second
        # runner must find the lock still held: start inside the margin.
        time.sleep(expected_deadline(now, period, margin) - now + 0.2)
    t0 = time.time()
    expected = expected_deadline(t0, period, margin)
    lock_owner = home_of(environ) / "runjobs.lock.owner"

    sh_argv = [str(RUNJOBS_SH), "--period", str(period), "--margin", str(margin)]
    with started(sh_argv, environ) as first:
        wait_for(lambda: lock_owner.exists() and str(first.pid) in lock_owner.read_text(),
                 timeout=expected - time.time() - 0.5, message="the first runner's lock")
        began = time.monotonic()
        second = subprocess.run(sh_argv, env=environ, capture_output=True, text=True, timeout=20)
        took = time.monotonic() - began
        assert first.poll() is None, "the second runner must have met a held lock"
        assert second.returncode == 0, second.stderr
        assert took < 3.0
        assert f"pid {first.pid}" in second.stdout + second.stderr

        code, _out, err = finished(first, timeout=expected - time.time() + 10)
        exited = time.time()
    assert code == 0, err
    assert expected - 0.2 <= exited <= expected + 1.0, (exited - t0, expected - t0)


def test_runner_started_inside_the_margin_targets_the_following_boundary(environ):
    period, margin = 4, 2
    now = time.time()
    # Start 0.3 s into the margin: the next boundary is then < 2 s away.
    start_at = expected_deadline(now, period, margin) + 0.3
    if start_at - period > now:
        start_at -= period
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    assert (t0 % period) >= period - margin, "the test must start inside the margin"
    expected = expected_deadline(t0, period, margin)
    assert expected - t0 > period - margin  # the boundary after next, minus margin

    with started([str(RUNJOBS_SH), "--period", str(period), "--margin", str(margin)],
                 environ) as proc:
        code, _out, err = finished(proc, timeout=expected - time.time() + 10)
        exited = time.time()
    assert code == 0, err
    assert expected - 0.2 <= exited <= expected + 1.0, (exited - t0, expected - t0)


# -- 4. memory does not build up across cycles -----------------------------------------

# Runs argv[2:] and writes its peak RSS (KiB, from the kernel's accounting of
# the waited-for child) to argv[1]; bin/runjobs.sh execs, so that child is the runner.
_PEAK_RSS = ("import resource, subprocess, sys\n"
             "code = subprocess.call(sys.argv[2:])\n"
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
             "open(sys.argv[1], 'w').write(str(peak))\n"
             "sys.exit(code)\n")


def peak_rss_mb(environ: dict[str, str], tmp_path: Path, *args: str) -> float:
    report = tmp_path / "peak.txt"
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(report), str(RUNJOBS_SH), *args],
                            env=environ, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    return int(report.read_text()) / 1024


@pytest.mark.slow
def test_memory_leaked_by_an_action_does_not_build_up_across_cycles(environ, store, tmp_path):
    configure(environ, '[actions.leak]\ncallable = "tests.sample_actions:leak"\n')
    peaks = []
    for _ in range(5):
        [job_id] = submit(store, JobSpec("leak", {"mb": 30}))
        peaks.append(peak_rss_mb(environ, tmp_path, "--once"))
        assert store.job_status(job_id) is Status.SUCCESS
    assert peaks[-1] <= peaks[0] + 10, peaks

    # The control: the same five jobs inside one process do build up.
    ids = submit(store, *[JobSpec("leak", {"mb": 30}) for _ in range(5)])
    together = peak_rss_mb(environ, tmp_path, "--once")
    assert set(statuses(store, ids)) == {Status.SUCCESS}
    assert together >= peaks[0] + 100, (together, peaks)


# -- 5. command params are literal argv ------------------------------------------------

def test_command_params_reach_the_program_as_literal_argv(environ, store, tmp_path):
    configure(environ, '[actions.echo]\ncommand = ["/bin/echo", "{text}"]\n')
    victims = [tmp_path / "semicolon", tmp_path / "subst"]
    texts = [f"; touch {victims[0]}", f"$(touch {victims[1]})"]
    ids = submit(store, *[JobSpec("echo", {"text": t}) for t in texts])

    result = run_sh(environ, "--once")

    assert result.returncode == 0, result.stderr
    assert statuses(store, ids) == [Status.SUCCESS, Status.SUCCESS]
    for victim in victims:
        assert not victim.exists(), f"{victim.name}: a param ran as a shell command"
    for job_id, text in zip(ids, texts):
        log_text = (home_of(environ) / "logs" / "jobs" / f"{job_id}.log").read_text()
        assert text in log_text


# -- 6. an unregistered name in a row imports nothing -----------------------------------

def test_unregistered_action_in_a_row_fails_without_importing(environ, store, tmp_path):
    marker = tmp_path / "imported"
    # The store does not validate names: this is a row written "another way".
    [job_id] = submit(store, JobSpec("tests.import_marker:run"))
    env = dict(environ, RUNJOBS_TEST_IMPORT_MARKER=str(marker))

    result = run_sh(env, "--once")

    assert result.returncode == 0, result.stderr
    job = store.job_get(job_id)
    assert job.status is Status.FAILURE
    assert "not registered" in (job.error or "")
    assert not marker.exists(), "the runner imported the module a row named"
    # The marker works: importing the module does leave it.
    subprocess.run([sys.executable, "-c", "import tests.import_marker"], env=env, check=True,
                   timeout=30)
    assert marker.exists()


# -- 7. file modes -----------------------------------------------------------------------

def test_job_and_log_files_are_not_readable_by_others(environ, store, request):
    home = home_of(environ)
    [job_id] = submit(store, JobSpec("fail"))  # a failure writes to the job's log

    # A permissive umask: the modes must come from runjobs, not from luck.
    result = subprocess.run([str(RUNJOBS_SH), "--once"], env=environ, capture_output=True,
                            text=True, timeout=PROCESS_TIMEOUT, preexec_fn=lambda: os.umask(0))

    assert result.returncode == 0, result.stderr
    assert store.job_status(job_id) is Status.FAILURE
    paths = [home / "logs", home / "logs" / "jobs", home / "logs" / "runjobs.log",
             home / "logs" / "jobs" / f"{job_id}.log"]
    if request.node.callspec.params["db_url"] == "sqlite":
        paths += [home / "runjobs.db"]
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(home)} is {mode:o}"


@pytest.mark.parametrize("level, per_success", [("info", False), ("debug", True)])
def test_runner_log_lines_per_job_follow_log_level(environ, store, level, per_success):
    """A SUCCESS gets its own line only at debug level (at thousands of jobs a
    second the lines cost a sixth of the drain); any other outcome always
    does, and the exit line counts every outcome."""
    configure(environ, f'log_level = "{level}"\n')
    ok = submit(store, *[JobSpec("noop") for _ in range(3)])
    [failed] = submit(store, JobSpec("fail"))

    result = run_sh(environ, "--once")

    assert result.returncode == 0, result.stderr
    text = (home_of(environ) / "logs" / "runjobs.log").read_text()
    assert f"job {failed} (fail) ended FAILURE" in text
    assert all((f"job {job_id} (noop) ended SUCCESS" in text) == per_success for job_id in ok)
    assert "exited; jobs ended: 1 FAILURE, 3 SUCCESS" in text


# -- 8. SIGTERM drains -------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_stops_claiming_and_lets_the_running_job_finish(environ, store):
    configure(environ, 'capacity = {default = 1}\n')
    [sleeper] = submit(store, JobSpec("sleep", {"seconds": 2}, priority=10))
    waiting = submit(store, *[JobSpec("noop") for _ in range(3)])
    period, margin = 60, 5
    now = time.time()
    if expected_deadline(now, period, margin) - now < 10:  # keep the cycle's own deadline away
        time.sleep(expected_deadline(now, period, margin) - now + 0.2)

    with started(runjobs_cmd("run", "--period", str(period), "--margin", str(margin)),
                 environ) as proc:
        wait_for(lambda: store.job_status(sleeper) is Status.RUNNING, timeout=15,
                 message="the sleep job to run")
        proc.send_signal(signal.SIGTERM)
        signaled = time.monotonic()
        code, _out, err = finished(proc, timeout=15)
        took = time.monotonic() - signaled
    assert code == 0, err
    assert took < 5.0
    assert store.job_status(sleeper) is Status.SUCCESS
    assert statuses(store, waiting) == [Status.PENDING] * 3
    assert not store.jobs_list([Status.QUEUED, Status.RUNNING])


# -- what an idle cycle imports -----------------------------------------------------------


def test_an_idle_cycle_imports_only_what_its_database_needs(environ, store, settings):
    """An idle `run --once` with the schema at head: no Alembic, and no
    SQLAlchemy dialect or driver of the other database (the PostgreSQL
    dialect alone cost a SQLite cycle 60 ms)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *runjobs_cmd("run", "--once")[1:]],
                            env=environ, capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "runjobs.store" in imported and "sqlalchemy" in imported  # the check can see
    unwanted = {"alembic"}
    unwanted |= ({"sqlalchemy.dialects.postgresql", "psycopg2"} if settings.database_url.startswith("sqlite")
                 else {"sqlalchemy.dialects.sqlite"})
    assert not unwanted & imported, sorted(unwanted & imported)
