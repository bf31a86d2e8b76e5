"""A full log disk (issue 12, item 3): a job's log is a convenience, its
status is not.

The log folder (`RUNJOBS_LOG_DIR`, so `runjobs.log` too) is a real 1 MB
tmpfs; the runners are real `runjobs run --once` processes. Each job that
logs writes more than the whole disk holds, so each one runs out of space:
a callable in a thread, one in a child process (`isolation = "process"`),
and a command. Then, with the disk still full, jobs whose log cannot even
be started; then, with space freed, a new job runs (no capacity is held).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from runjobs.models import JobSpec
from runjobs.store import Store
from tests.conftest import cli, runjobs_cmd, show_job, write_config

RUN_DEADLINE = 45.0       # seconds for one `run --once`; it takes a few
STDERR_LIMIT = 4096       # bytes: a few lines, never a traceback per log line
LINES = 20000             # about 2 MB of log per callable job
SEQ = 200000              # about 1.3 MB of output from the command

CONFIG = """
[actions.chatty]
callable = "tests.sample_actions:log_lines"

[actions.chatty_process]
callable = "tests.sample_actions:log_lines"
isolation = "process"

[actions.chatty_command]
command = ["seq", "{count}"]
"""


@pytest.fixture
def log_disk(tmp_path):
    """A 1 MB tmpfs for the log folder, unmounted afterwards."""
    folder = tmp_path / "logs"
    folder.mkdir(mode=0o700)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                            str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs (needs root): {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def env(environ, log_disk):
    write_config(Path(environ["RUNJOBS_HOME"]), CONFIG)
    return dict(environ, RUNJOBS_LOG_DIR=str(log_disk))


def run_once(env: dict[str, str], stderr_path: Path) -> int | None:
    """`runjobs run --once` to its end; None if it outlived RUN_DEADLINE (killed).
    Its stderr goes to a file: a flood must not block it on a pipe."""
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(runjobs_cmd("run", "--once"), env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)
        try:
            return proc.wait(timeout=RUN_DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def check_run(env: dict[str, str], stderr_path: Path) -> str:
    """Runs a cycle and checks it ended in time with a short stderr; returns it."""
    code = run_once(env, stderr_path)
    size = stderr_path.stat().st_size
    with open(stderr_path, "rb") as handle:
        head = handle.read(STDERR_LIMIT).decode(errors="replace")
    assert code == 0, f"run --once: exit {code} (None: still running after " \
                      f"{RUN_DEADLINE}s); stderr {size} bytes, starting:\n{head}"
    assert size < STDERR_LIMIT, f"stderr is {size} bytes, starting:\n{head}"
    assert "Logging error" not in head and "Traceback" not in head, head
    return head


def said_incomplete(text: str, job_id: int) -> int:
    """How many runner log lines say job `job_id`'s log is incomplete, and why."""
    pattern = rf"job {job_id}\b[^\n]*log is incomplete[^\n]*No space left on device"
    return len(re.findall(pattern, text))


def submit(store: Store, action: str, **params) -> int:
    [job] = store.jobs_submit([JobSpec(action, params)])
    return job.id


def assert_incomplete(store: Store, job_id: int) -> None:
    job = store.job_get(job_id)
    assert job.status == "SUCCESS", job
    assert "log incomplete" in job.output and "No space left on device" in job.output, job


def assert_show_says_incomplete(env: dict[str, str], job_id: int) -> None:
    """What an operator sees: `show ID --json` and `show ID`."""
    assert "log incomplete" in show_job(env, job_id)["output"]
    text = cli(env, "show", str(job_id))
    assert text.returncode == 0 and "log incomplete" in text.stdout, text


def assert_disk_full(folder: Path) -> None:
    """A new file there cannot take a byte: else the second cycle means nothing."""
    probe = folder / "probe"
    try:
        with pytest.raises(OSError) as info:
            with open(probe, "wb", buffering=0) as handle:
                handle.write(b"x")
        assert info.value.errno == errno.ENOSPC
    finally:
        probe.unlink(missing_ok=True)


def test_a_full_log_disk_costs_no_job_its_status(env, store, log_disk, tmp_path):
    # 1. Jobs that fill the disk while they run.
    loggers = [submit(store, "chatty", lines=LINES), submit(store, "chatty", lines=LINES),
               submit(store, "chatty_process", lines=LINES),
               submit(store, "chatty_command", count=SEQ)]
    noop = submit(store, "noop")
    stderr = check_run(env, tmp_path / "first.stderr")
    runner_log = (log_disk / "runjobs.log").read_text(errors="replace")
    for job_id in loggers:
        assert_incomplete(store, job_id)
        # Once per job, in runjobs.log or (when that cannot be written) on stderr.
        assert said_incomplete(runner_log + stderr, job_id) == 1, runner_log + stderr
    assert (store.job_get(noop).status, store.job_get(noop).output) == ("SUCCESS", None)
    assert_show_says_incomplete(env, loggers[0])

    # 2. The disk still full: logs that cannot even be started.
    assert_disk_full(log_disk / "jobs")
    late = [submit(store, "chatty", lines=10), submit(store, "chatty_process", lines=10),
            submit(store, "chatty_command", count=10)]
    check_run(env, tmp_path / "second.stderr")
    for job_id in late:
        assert_incomplete(store, job_id)

    # 3. Space freed: new jobs run, and a log is whole again.
    for path in (log_disk / "jobs").iterdir():
        path.unlink()
    after = [submit(store, "noop"), submit(store, "chatty", lines=10)]
    check_run(env, tmp_path / "third.stderr")
    for job_id in after:
        job = store.job_get(job_id)
        assert (job.status, job.output) == ("SUCCESS", None), job
    assert len((log_disk / "jobs" / f"{after[1]}.log").read_text().splitlines()) == 10
