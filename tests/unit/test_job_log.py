"""A job's log that cannot be written (issue 12, item 3) costs the job
nothing but a note. /dev/full stands in for a full disk: every write to it
fails with ENOSPC. (tests/process/test_log_disk.py does it on a real full
tmpfs, with real runners.)"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pytest

from runjobs.actions import Action, JobContext, JobLog
from runjobs.executor import execute
from runjobs.files import Access
from runjobs.isolation import run_in_process
from runjobs.models import Status
from tests.conftest import REPO

FULL = Path("/dev/full")


def run(action: Action, params: dict, log_path: Path = FULL):
    """Executes `action` as job 7 into `log_path`; (outcome, why the log is incomplete)."""
    job_log = JobLog(log_path, Access())
    ctx = JobContext(7, params, 1, job_log)
    if action.isolation == "process":
        outcome = run_in_process(action, ctx, job_log, grace=2.0)
    else:
        outcome = execute(action, ctx, job_log, grace=2.0)
    ctx.close_log()  # never raises
    return outcome, ctx.log_incomplete


@pytest.fixture(autouse=True)
def importable_samples(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # for the child of isolation = "process"


def test_a_callable_that_logs_to_a_full_disk_succeeds_and_says_so_once(capfd):
    outcome, why = run(Action("t", target="tests.sample_actions:log_lines"), {"lines": 2000})
    assert outcome.status == Status.SUCCESS
    assert why.startswith("writing /dev/full failed: No space left on device (ENOSPC)")
    assert capfd.readouterr().err == ""  # not logging's "Logging error" per line


def test_a_log_whose_folder_cannot_be_made_costs_the_job_nothing(tmp_path):
    (tmp_path / "logs").write_text("a file where the folder should be")
    outcome, why = run(Action("t", target="tests.sample_actions:log_lines"), {"lines": 5},
                       log_path=tmp_path / "logs" / "jobs" / "7.log")
    assert outcome.status == Status.SUCCESS
    assert "Not a directory" in why


def test_a_log_that_is_written_whole_is_not_incomplete(tmp_path):
    path = tmp_path / "7.log"
    outcome, why = run(Action("t", target="tests.sample_actions:log_lines"), {"lines": 5}, path)
    assert (outcome.status, why) == (Status.SUCCESS, None)
    assert len(path.read_text().splitlines()) == 5


def test_a_command_whose_log_is_full_succeeds():
    # seq fails when its own stdout cannot be written: the runner's pipe takes it all.
    outcome, why = run(Action("t", command=("seq", "200000")), {})
    assert outcome.status == Status.SUCCESS, outcome
    assert "No space left on device" in why


def test_a_command_is_done_when_it_exits_though_a_child_keeps_its_output_open(tmp_path):
    path = tmp_path / "7.log"
    started = time.monotonic()
    outcome, why = run(Action("t", command=("sh", "-c", "echo first; sleep 5 >/dev/null & echo last")),
                       {}, path)
    assert time.monotonic() - started < 4
    assert (outcome.status, why) == (Status.SUCCESS, None)
    assert path.read_text().splitlines()[1:] == ["first", "last"]  # after the attempt's header


@pytest.mark.parametrize("target", ["log_lines", "print_lines"])
def test_a_process_isolated_callable_whose_log_is_full_succeeds(target):
    action = Action("t", target=f"tests.sample_actions:{target}", isolation="process")
    outcome, why = run(action, {"lines": 20000})
    assert outcome.status == Status.SUCCESS, outcome
    assert "No space left on device" in why


def test_a_process_isolated_callables_output_reaches_its_log(tmp_path):
    path = tmp_path / "7.log"
    action = Action("t", target="tests.sample_actions:print_lines", isolation="process")
    outcome, why = run(action, {"lines": 3}, path)
    assert (outcome.status, why) == (Status.SUCCESS, None)
    assert len(path.read_text().splitlines()) == 3


def test_runner_log_on_a_full_disk_falls_back_to_stderr_saying_why_once(capfd):
    from runjobs.cycle import RunnerLog

    fallback_text = io.StringIO()
    handler = RunnerLog(FULL, fallback=logging.StreamHandler(fallback_text))
    logger = logging.Logger("runjobs.test", logging.INFO)
    logger.addHandler(handler)
    for number in range(50):
        logger.warning("job %s: something an operator should read", number)
    handler.close()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "cannot write /dev/full (No space left on device)" in err, err
    assert fallback_text.getvalue().count("something an operator should read") == 50
