"""`Runner.tick(now)` driven by hand on a clock the test holds: what a round
does at a given moment, against a real database (SQLite file and
PostgreSQL), with real job threads.

The monotonic clock here is the test's; the database's clock (job times)
is real, so jobs are made due or expired relative to it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from runjobs.actions import Registry
from runjobs.clock import Clock
from runjobs.config import load_settings
from runjobs.models import JobSpec, Status
from runjobs.runner import Runner
from tests.conftest import wait_for, write_config

START = 1000.0   # the test's monotonic time of the first round


class HeldClock:
    """A clock that moves only when the test says."""

    def __init__(self) -> None:
        self.wall_now = 1_800_000_000.0
        self.monotonic_now = START

    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall_now, monotonic=lambda: self.monotonic_now)


@pytest.fixture
def held() -> HeldClock:
    return HeldClock()


@pytest.fixture
def runner(environ, store, held):
    write_config(Path(environ["RUNJOBS_HOME"]), 'poll_interval = "1s"\n')
    settings = load_settings(environ)
    runner = Runner(settings, store, Registry(settings), clock=held.clock())
    runner.register(None)
    yield runner
    for entry in list(runner.running.values()):  # leave no thread behind
        runner.threads.stop(entry, "test over")
    wait_for(lambda: runner.tick(START + 10_000) and not runner.running, timeout=10)


def submit(store, spec: JobSpec) -> int:
    return store.jobs_submit([spec])[0].id


def ended_at(runner: Runner, now: float, job_id: int, store) -> Status:
    """Rounds at `now` until the job's outcome is recorded; its status."""
    wait_for(lambda: runner.tick(now) and job_id not in runner.running
             and store.job_status(job_id).is_final, timeout=10,
             message=f"job {job_id} recorded")
    return store.job_status(job_id)


def test_a_round_starts_a_due_job_and_a_later_round_records_its_end(runner, store):
    job_id = submit(store, JobSpec("noop"))
    assert runner.tick(START).started == 1
    assert ended_at(runner, START + 0.01, job_id, store) is Status.SUCCESS


def test_a_timeout_is_measured_on_the_runners_monotonic_clock(runner, store):
    job_id = submit(store, JobSpec("sleep", {"seconds": 60}, timeout=10))
    assert runner.tick(START).started == 1
    runner.tick(START + 9.9)
    assert job_id in runner.running and not runner.running[job_id].stop_sent
    runner.tick(START + 10.1)
    assert runner.running[job_id].stop_sent
    assert ended_at(runner, START + 10.2, job_id, store) is Status.FAILURE
    assert store.job_get(job_id).error == "timed out after 10s"


def test_expiry_runs_once_every_five_poll_intervals(runner, store):
    past = store.db_now() - dt.timedelta(seconds=1)
    first = submit(store, JobSpec("noop", max_start_at=past))
    runner.tick(START)
    assert store.job_status(first) is Status.EXPIRED
    second = submit(store, JobSpec("noop", max_start_at=past))
    runner.tick(START + 4.9)
    assert store.job_status(second) is Status.PENDING   # not due again yet
    runner.tick(START + 5.0)
    assert store.job_status(second) is Status.EXPIRED


def test_a_cancel_is_looked_for_every_half_second_while_jobs_run(runner, store):
    job_id = submit(store, JobSpec("sleep", {"seconds": 60}))
    runner.tick(START)                  # started; nothing ran to look for cancels
    runner.tick(START + 0.1)            # looked: nothing canceled
    assert store.job_cancel(job_id) is Status.TO_CANCEL
    runner.tick(START + 0.5)            # not looked again yet
    assert not runner.running[job_id].stop_sent
    runner.tick(START + 0.6)
    assert runner.running[job_id].stop_sent
    assert ended_at(runner, START + 0.7, job_id, store) is Status.CANCELED


def test_a_runner_past_its_deadline_on_the_wall_clock_stops_claiming(runner, store, held):
    """run() reads the deadline on the wall clock, not the monotonic one."""
    job_id = submit(store, JobSpec("noop"))
    runner.run(deadline=held.wall_now - 1)   # already past: claims nothing, exits
    assert not runner.claiming
    assert store.job_status(job_id) is Status.PENDING
