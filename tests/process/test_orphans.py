"""A job never runs beside its own retry: a runner killed with SIGKILL leaves
no command behind, and a runner frozen with SIGSTOP past its heartbeat
timeout stops its job as soon as it runs again, records nothing and says so.

Real runner processes, real signals, real commands, on both databases.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, runjobs_cmd, submit_job as submit, wait_for, write_config
from runjobs.config import load_settings
from runjobs.models import FINAL, Status
from runjobs.store import open_store

HEARTBEAT = 0.5
CONFIG = f"""
poll_interval = "0.1s"
heartbeat_interval = "{HEARTBEAT}s"
heartbeat_timeout = "2s"
grace_period = "1s"
retry_backoff = "0.2s"
[actions.copy]
command = ["sh", "-c", "{sys.executable} {REPO}/tests/sample_actions.py \\"$@\\"; exit $?",
           "sh", "{{lock}}", "{{out}}", "{{seconds}}"]
[actions.direct]
command = ["{sys.executable}", "{REPO}/tests/sample_actions.py", "{{lock}}", "{{out}}", "{{seconds}}"]
[actions.ticker]
callable = "tests.sample_actions:ticker"
"""


@pytest.fixture
def store(environ):
    write_config(Path(environ["RUNJOBS_HOME"]), CONFIG)
    store = open_store(load_settings(environ))
    yield store
    store.dispose()


def cycle_args(min_left: float, margin: int = 1) -> list[str]:
    """`--period P --margin M` for a cycle that lasts at least `min_left` s."""
    now = time.time()
    for period in range(int(min_left) + margin + 2, 600):
        if period - now % period - margin >= min_left:
            return ["--period", f"{period}s", "--margin", f"{margin}s"]
    raise AssertionError("no period fits")


@contextlib.contextmanager
def runner(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen]:
    """`runjobs run ARGS` in a process group of its own, killed on the way
    out (SIGCONT first, in case it is stopped)."""
    process = subprocess.Popen(runjobs_cmd("run", *args), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_command_dies_with_its_sigkilled_runner(environ, tmp_path, store):
    """The parent-death signal: a command that is a single process ends when
    its runner is SIGKILLed, before any other runner comes."""
    out, lock = tmp_path / "copies.txt", tmp_path / "copy.lock"
    submit(environ, "direct", f"lock={lock}", f"out={out}", "seconds=30")
    with runner(environ, *cycle_args(20)) as first:
        wait_for(lambda: lines(out), timeout=15, message="the command to start")
        (_, pid, _), = lines(out)
        assert alive(int(pid))
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        wait_for(lambda: not alive(int(pid)), timeout=2, message="the command to die")


def test_sigkilled_runners_command_never_runs_beside_its_retry(environ, tmp_path, store):
    """The command is `sh -c 'python …; exit $?'`: sh leads the group, the
    work runs in its child and holds a flock. SIGKILL of the runner's group
    does not reach the command's own session; the parent-death signal ends
    sh, and the next runner on the node kills the rest before the retry."""
    out, lock = tmp_path / "copies.txt", tmp_path / "copy.lock"
    job_id = submit(environ, "copy", f"lock={lock}", f"out={out}", "seconds=5",
                    "--retries", "1")
    with runner(environ, *cycle_args(20)) as first:
        wait_for(lambda: lines(out), timeout=15, message="the first copy to start")
        runner_id = store.job_get(job_id).runner_id
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
    (_, first_pid, _), = lines(out)

    # The next runner on the node: its pid check finds the first one dead.
    second = subprocess.run(runjobs_cmd("run", "--once"), env=environ, timeout=30,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    job = store.job_get(job_id)
    assert (job.status, job.attempt) == (Status.SUCCESS, 2), job
    records = lines(out)
    assert [what for what, *_ in records] == ["start", "start", "end"], records
    assert records[1][1] != first_pid
    assert not alive(int(first_pid))
    events = store.job_events(job_id)
    rescued = [e for e in events if e.previous == Status.RUNNING and e.status == Status.PENDING]
    assert len(rescued) == 1 and f"runner {runner_id}" in rescued[0].note
    log = (Path(environ["RUNJOBS_HOME"]) / "logs" / "runjobs.log").read_text()
    assert re.search(rf"process group \d+ \(RUNJOBS_GROUP={runner_id}\.{job_id}\): \d+ process",
                     log), log


def test_frozen_runner_stops_its_job_records_nothing_and_exits(environ, tmp_path, store):
    """SIGSTOP past heartbeat_timeout: another node rescues the job and runs
    its retry. On SIGCONT the frozen runner finds itself declared dead within
    a heartbeat, stops its job at once, writes nothing, says its result was
    discarded, and exits; its log claims no SUCCESS."""
    env_a = {**environ, "RUNJOBS_NODE": "node-a"}
    home_b = tmp_path / "home-b"
    write_config(home_b, CONFIG)
    env_b = {**environ, "RUNJOBS_NODE": "node-b", "RUNJOBS_HOME": str(home_b),
             "RUNJOBS_CONFIG": str(home_b / "runjobs.toml")}
    out = tmp_path / "ticks.txt"
    job_id = submit(env_a, "ticker", f"path={out}", "steps:=100", "--retries", "1")

    with runner(env_a, *cycle_args(30)) as frozen:
        wait_for(lambda: len(lines(out)) >= 5, timeout=15, message="the job to run on node-a")
        runner_a = store.job_get(job_id).runner_id
        os.killpg(frozen.pid, signal.SIGSTOP)
        with runner(env_b, *cycle_args(20)):
            wait_for(lambda: any(attempt == "2" for attempt, *_ in lines(out)), timeout=15,
                     message="the retry to run on node-b")
            resumed = time.time()
            os.killpg(frozen.pid, signal.SIGCONT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                frozen.wait(timeout=HEARTBEAT + 3)
            exited = time.time()
            # The frozen attempt stopped at once: within a heartbeat of SIGCONT.
            first_after = [float(at) - resumed for attempt, _, at in lines(out)
                           if attempt == "1" and float(at) > resumed]
            assert not first_after or max(first_after) < HEARTBEAT + 0.3, first_after
            assert frozen.returncode == 0, exited - resumed
            wait_for(lambda: store.job_get(job_id).status in FINAL, timeout=15,
                     message="the retry to end")
    # It wrote nothing: the retry's outcome stands, every event after the
    # rescue is another runner's.
    job = store.job_get(job_id)
    assert (job.status, job.attempt, job.node) == (Status.SUCCESS, 2, "node-b"), job
    events = store.job_events(job_id)
    rescue = next(i for i, e in enumerate(events) if e.previous == Status.RUNNING)
    assert events[rescue].status == Status.PENDING
    assert all(e.runner_id != runner_a for e in events[rescue + 1:]), events
    assert [r.state for r in store.runners_list() if r.id == runner_a] == ["dead"]
    log = (Path(env_a["RUNJOBS_HOME"]) / "logs" / "runjobs.log").read_text()
    assert f"runner {runner_a} was declared dead" in log, log
    assert re.search(rf"job {job_id}: its result \w+ discarded", log), log
    assert not re.search(r"jobs ended: [^\n]*SUCCESS", log.split("was declared dead")[-1]), log
    assert not re.search(r"ended SUCCESS", log), log
