"""Cancel, timeouts, unstoppable jobs, SIGTERM and the handoff between
cycles, with real runner processes on both databases."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runjobs.api import Client

from conftest import (
    show_job as show, submit_job as submit, RUNJOBS_SH, cli, runjobs_cmd, wait_for,
    write_config,
)

CONFIG = """
grace_period = "1s"
poll_interval = "0.2s"
[actions.busy]
callable = "tests.sample_actions:loop_forever"
[actions.stubborn]
callable = "tests.sample_actions:ignore_stops"
[actions.wrapper]
command = ["{python}", "-c", "import subprocess, sys, os; c = subprocess.Popen(['sleep', '60']); open(sys.argv[1], 'w').write(f'{{os.getpid()}} {{c.pid}}'); c.wait()", "{path}"]
[actions.stuck]
callable = "tests.sample_actions:sleep_in_c"
isolation = "process"
[actions.leak]
callable = "tests.sample_actions:leak"
isolation = "process"
"""


@pytest.fixture
def env(environ):
    write_config(Path(environ["RUNJOBS_HOME"]),
                 CONFIG.replace("{python}", sys.executable))
    return environ


def status(env, job_id) -> str:
    return show(env, job_id)["status"]


def start_runner(env, *args) -> subprocess.Popen:
    # Its log is runjobs.log in the home: no pipe to drain or leave open.
    return subprocess.Popen(runjobs_cmd("run", *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def wait_status(env, job_id, wanted, timeout) -> float:
    """Seconds until the job reaches one of `wanted`."""
    start = time.monotonic()
    wait_for(lambda: status(env, job_id) in wanted, timeout=timeout, interval=0.1,
             message=f"job {job_id} to become {wanted}")
    return time.monotonic() - start


def test_cancel_running_python_loop_within_3s(env):
    job_id = submit(env, "busy")
    runner = start_runner(env, "--once")
    try:
        wait_status(env, job_id, {"RUNNING"}, 15)
        assert cli(env, "cancel", str(job_id)).stdout.strip() == f"job {job_id}: TO_CANCEL"
        assert wait_status(env, job_id, {"CANCELED"}, 3) < 3
        runner.wait(timeout=10)
        assert runner.returncode == 0
    finally:
        stop(runner)


def test_cancel_command_kills_it_and_its_child(env, tmp_path):
    pids_file = tmp_path / "pids"
    job_id = submit(env, "wrapper", f"path={pids_file}")
    runner = start_runner(env, "--once")
    try:
        wait_for(lambda: pids_file.exists() and pids_file.read_text(), timeout=15)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert all(psutil.pid_exists(p) for p in pids)
        cli(env, "cancel", str(job_id))
        assert wait_status(env, job_id, {"CANCELED"}, 3) < 3
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=2,
                 message="the command and its child to be gone")
    finally:
        stop(runner)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_timeout_stops_sleep_as_failure(env):
    job_id = submit(env, "sleep", "seconds=30", "--timeout", "3s")
    runner = start_runner(env, "--once")
    try:
        wait_status(env, job_id, {"RUNNING"}, 15)
        started = time.monotonic()
        wait_status(env, job_id, {"FAILURE"}, 6)
        assert time.monotonic() - started < 6
        assert "timed out after 3s" in show(env, job_id)["error"]
    finally:
        stop(runner)


def test_job_that_ignores_stops_is_given_up_and_runner_exits(env):
    job_id = submit(env, "stubborn", "seconds:=120", "--timeout", "1s")
    runner = start_runner(env, "--once")
    try:
        runner.wait(timeout=20)
        job = show(env, job_id)
        assert job["status"] == "FAILURE"
        assert "could not be stopped" in job["error"]
    finally:
        stop(runner)


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_process_isolated_job_stuck_in_c_is_killed(env, tmp_path, how):
    pid_file = tmp_path / "pid"
    extra = ["--timeout", "2s"] if how == "timeout" else []
    job_id = submit(env, "stuck", f"path={pid_file}", "seconds:=120", *extra)
    runner = start_runner(env, "--once")
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text(), timeout=15)
        child = int(pid_file.read_text())
        if how == "cancel":
            cli(env, "cancel", str(job_id))
        final = {"CANCELED"} if how == "cancel" else {"FAILURE"}
        wait_status(env, job_id, final, 8)
        assert not _alive(child)
        job = show(env, job_id)
        assert job["peak_rss_kb"] and job["peak_rss_kb"] > 1000
        runner.wait(timeout=10)
    finally:
        stop(runner)


def test_process_isolation_records_peak_memory(env):
    small = submit(env, "leak", "mb:=1")
    big = submit(env, "leak", "mb:=80")
    runner = start_runner(env, "--once")
    try:
        runner.wait(timeout=30)
        small_kb, big_kb = show(env, small)["peak_rss_kb"], show(env, big)["peak_rss_kb"]
        assert show(env, big)["status"] == "SUCCESS"
        assert big_kb - small_kb > 70 * 1024
        assert "peak_rss_kb:" in cli(env, "show", str(big)).stdout
    finally:
        stop(runner)


def test_sigterm_mid_job_leaves_nothing_queued_or_running(env):
    long_job = submit(env, "sleep", "seconds:=60")
    waiting = [submit(env, "noop", "--in", "1s") for _ in range(3)]
    runner = start_runner(env, "--period", "60", "--margin", "1")
    try:
        wait_status(env, long_job, {"RUNNING"}, 15)
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=15)  # grace_period 1s, then the job is stopped
        assert status(env, long_job) == "CANCELED"
        assert "SIGTERM" in show(env, long_job)["error"]
        statuses = {status(env, j) for j in waiting} | {status(env, long_job)}
        assert not statuses & {"QUEUED", "RUNNING", "TO_CANCEL"}
    finally:
        stop(runner)


@pytest.mark.slow
def test_long_job_spans_cycles_while_short_ones_pass_and_capacity_holds(environ, tmp_path):
    """A 25 s job spans three 10 s cycles; 30 short jobs submitted meanwhile
    all finish before it; the node never runs more than its capacity of 2."""
    from runjobs.config import load_settings
    from runjobs.store import open_store

    write_config(Path(environ["RUNJOBS_HOME"]),
                 'capacity = {default = 2}\npoll_interval = "0.2s"\n')
    settings = load_settings(environ)
    store = open_store(settings)
    client = Client(settings, store)
    long_job = submit(environ, "sleep", "seconds:=25")
    started = time.monotonic()
    runners: list[subprocess.Popen] = []
    deadline = time.monotonic() + 45
    short: list[int] = []
    most_running = 0
    try:
        next_cycle = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_cycle:  # cron, every 5 s (half a cycle)
                runners.append(subprocess.Popen(
                    [str(RUNJOBS_SH), "--period", "10", "--margin", "2"], env=environ,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                next_cycle = time.monotonic() + 5
            # Ten short jobs at 3 s, 8 s and 13 s: while the long one runs.
            if len(short) < 30 and time.monotonic() - started > 3 + len(short) / 2:
                short += client.submit_many([{"action": "sleep", "params": {"seconds": 0.2}}] * 10)
            jobs = store.jobs_list(limit=100)
            most_running = max(most_running, sum(j.status.value == "RUNNING" for j in jobs))
            done = {j.id: j for j in jobs if j.status.is_final}
            if long_job in done and all(s in done for s in short):
                break
            time.sleep(0.3)
        jobs = {j.id: j for j in store.jobs_list(limit=100)}
        assert jobs[long_job].status.value == "SUCCESS"
        assert len(short) == 30
        assert all(jobs[s].status.value == "SUCCESS" for s in short)
        assert max(jobs[s].finished_at for s in short) < jobs[long_job].finished_at
        assert most_running <= 2
        # The handoff: while the long job's runner drained, a later cycle's
        # runner claimed short jobs (the batch at 13 s comes after any first
        # deadline, which is at most 12 s away).
        assert {jobs[s].runner_id for s in short} - {jobs[long_job].runner_id}
        for process in runners:  # each cycle's process exits once its own jobs end
            process.wait(timeout=15)
        states = {r.state for r in store.runners_list()}
        assert states == {"exited"}
    finally:
        for process in runners:
            stop(process)
        store.dispose()
