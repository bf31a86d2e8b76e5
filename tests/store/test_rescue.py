"""Dead runners and their jobs, on a real SQLite file and a real PostgreSQL.

Each test writes the crashed state directly (a runner row that owns QUEUED or
RUNNING jobs, its heartbeat aged with a plain UPDATE, or its pid one that no
longer exists on this host), calls `rescue_once` once and checks what
became of the jobs and the runner.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import threading

import pytest
import sqlalchemy as sa

from conftest import cli, queue_directly, wait_for
from runjobs.groups import MARKER, marker
from runjobs.models import Job, JobSpec, Outcome, Status
from runjobs.rescue import rescue_once
from runjobs.runner import boot_id
from runjobs.schema import jobs, runners
from runjobs.store import Store, open_store

CAPACITY = {"default": 10}
OTHER = "node-x"          # a node other than the rescuer's own
BOOT = boot_id()


def submit(store: Store, action: str = "sleep", **fields) -> int:
    return store.jobs_submit([JobSpec(action, {"seconds": 60}, **fields)])[0].id


def register(store: Store, node: str = OTHER, pid: int | None = None,
             boot: str | None = "boot-1") -> int:
    return store.runner_register(node, pid or os.getpid(), boot, None, "test")


def start(store: Store, runner_id: int, node: str = OTHER) -> list[Job]:
    """One round of the runner: what is due and fits, claimed and started."""
    return store.runner_round(runner_id, node, CAPACITY, [], claim=True)


def start_ids(store: Store, runner_id: int, node: str = OTHER) -> list[int]:
    return [job.id for job in start(store, runner_id, node)]


def age(store: Store, runner_id: int, seconds: float = 600) -> None:
    """The runner's last heartbeat was `seconds` ago on the database's clock."""
    with store.engine.begin() as conn:
        conn.execute(sa.update(runners).where(runners.c.id == runner_id)
                     .values(heartbeat_at=store.db_now() - dt.timedelta(seconds=seconds)))


def crashes(store: Store, job_id: int) -> int:
    with store.engine.begin() as conn:
        return conn.execute(sa.select(jobs.c.crashes).where(jobs.c.id == job_id)).scalar_one()


def runner_state(store: Store, runner_id: int) -> str:
    with store.engine.begin() as conn:
        return conn.execute(sa.select(runners.c.state).where(runners.c.id == runner_id)).scalar_one()


def gone_pid() -> int:
    """A pid that existed a moment ago and no longer does."""
    process = subprocess.Popen(["true"])
    process.wait()
    assert not os.path.exists(f"/proc/{process.pid}")
    return process.pid


def crash_once(store: Store, settings, job_id: int, node: str = OTHER,
               boot: str = "boot-1") -> Status:
    """Claim and start `job_id` on a new runner, let that runner die, rescue."""
    runner = register(store, node, boot=boot)
    assert start_ids(store, runner, node) == [job_id]
    age(store, runner)
    assert rescue_once(store, settings, BOOT) == 1
    return store.job_get(job_id).status


# -- what becomes of each job ---------------------------------------------------------


def test_dead_runners_queued_jobs_go_back_to_pending_unchanged(store, settings):
    ids = [submit(store, retries=0), submit(store, retries=0)]
    runner = register(store)
    queue_directly(store, runner, ids, OTHER)
    age(store, runner)

    assert rescue_once(store, settings, BOOT) == 2
    for job_id in ids:
        job = store.job_get(job_id)
        assert (job.status, job.attempt, job.runner_id, job.node, job.queued_at) == (
            Status.PENDING, 0, None, None, None)
        assert crashes(store, job_id) == 0
    assert runner_state(store, runner) == "dead"
    # Back in the queue: another runner can claim them.
    assert sorted(start_ids(store, register(store, "node-y"), "node-y")) == sorted(ids)


def test_running_job_with_retries_left_is_retried_naming_the_dead_runner(store, settings):
    job_id = submit(store, retries=1)
    runner = register(store)
    assert start_ids(store, runner) == [job_id]
    age(store, runner)

    assert rescue_once(store, settings, BOOT) == 1
    job = store.job_get(job_id)
    assert (job.status, job.attempt, job.runner_id, job.finished_at) == (
        Status.PENDING, 1, None, None)
    assert f"runner {runner}" in job.error and OTHER in job.error
    assert job.run_at <= store.db_now()  # due again at once
    assert crashes(store, job_id) == 1
    assert runner_state(store, runner) == "dead"
    # The retry runs as attempt 2.
    other = register(store, "node-y")
    assert [j.attempt for j in start(store, other, "node-y")] == [2]


def test_running_job_without_retries_left_is_abandoned_naming_the_dead_runner(store, settings):
    none_left = submit(store, retries=0)
    runner = register(store)
    assert start_ids(store, runner) == [none_left]
    age(store, runner)

    assert rescue_once(store, settings, BOOT) == 1
    job = store.job_get(none_left)
    assert job.status == Status.ABANDONED and job.finished_at is not None
    assert f"runner {runner}" in job.error and "no retries left" in job.error


def test_last_retry_used_up_is_abandoned(store, settings):
    job_id = submit(store, retries=1)
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crash_once(store, settings, job_id) == Status.ABANDONED
    assert store.job_get(job_id).attempt == 2


def test_job_being_canceled_ends_canceled_not_retried(store, settings):
    running, queued = submit(store, retries=3), submit(store, retries=3)
    runner = register(store)
    queue_directly(store, runner, [queued], OTHER)
    assert start_ids(store, runner) == [running]
    assert store.job_cancel(running) == Status.TO_CANCEL
    assert store.job_cancel(queued) == Status.TO_CANCEL
    age(store, runner)

    assert rescue_once(store, settings, BOOT) == 2
    for job_id in (running, queued):
        job = store.job_get(job_id)
        assert job.status == Status.CANCELED and job.finished_at is not None
        assert f"runner {runner}" in job.error


# -- crashes in a row: poison jobs ---------------------------------------------------------


def test_job_that_took_its_runner_down_crash_limit_times_is_abandoned(store, settings):
    assert settings.crash_limit == 3
    job_id = submit(store, retries=10)
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crashes(store, job_id) == 2
    assert crash_once(store, settings, job_id) == Status.ABANDONED
    job = store.job_get(job_id)
    assert "3 times" in job.error and "not retried" in job.error
    assert job.attempt == 3 and crashes(store, job_id) == 3


def test_crash_limit_setting_is_honoured(store, settings):
    settings = settings.replace(crash_limit=1)
    job_id = submit(store, retries=10)
    assert crash_once(store, settings, job_id) == Status.ABANDONED
    assert "1 times" in store.job_get(job_id).error


def test_a_run_that_ends_in_its_runner_resets_the_count(store, settings):
    job_id = submit(store, retries=10)
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crash_once(store, settings, job_id) == Status.PENDING
    # The third attempt fails on its own, and is retried: no crash.
    runner = register(store)
    [job] = start(store, runner)
    assert store.jobs_finish(runner, [(job, Outcome(Status.FAILURE, error="boom"), 0.0)]) == [
        job_id]
    assert crashes(store, job_id) == 0
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crash_once(store, settings, job_id) == Status.PENDING
    assert crash_once(store, settings, job_id) == Status.ABANDONED


def test_host_restart_on_this_node_is_not_counted_against_the_job(store, settings):
    job_id = submit(store, retries=10)
    for _ in range(2):
        assert crash_once(store, settings, job_id) == Status.PENDING
    # A runner of this node from an earlier boot: dead at once (its heartbeat
    # is fresh), and the host's restart took every job down.
    runner = register(store, settings.node, pid=os.getppid(), boot="an-earlier-boot")
    assert start_ids(store, runner, settings.node) == [job_id]
    assert rescue_once(store, settings, "this-boot") == 1
    job = store.job_get(job_id)
    assert job.status == Status.PENDING and crashes(store, job_id) == 2
    assert "restart" in job.error and f"runner {runner}" in job.error
    assert runner_state(store, runner) == "dead"


def test_newer_runner_of_the_node_with_another_boot_means_host_restart(store, settings):
    job_id = submit(store, retries=10)
    for _ in range(2):
        assert crash_once(store, settings, job_id, boot="boot-1") == Status.PENDING
    old = register(store, OTHER, boot="boot-1")
    assert start_ids(store, old) == [job_id]
    age(store, old)
    newer = register(store, OTHER, boot="boot-2")   # the host came back
    assert rescue_once(store, settings, BOOT) == 1
    assert store.job_get(job_id).status == Status.PENDING
    assert crashes(store, job_id) == 2
    assert runner_state(store, newer) == "claiming"


# -- who is dead -------------------------------------------------------------------------


def test_runner_with_a_fresh_heartbeat_is_left_alone(store, settings):
    job_id = submit(store, retries=0)
    runner = register(store)
    start(store, runner)
    age(store, runner, settings.heartbeat_timeout / 3)

    assert rescue_once(store, settings, BOOT) == 0
    assert store.job_get(job_id).status == Status.RUNNING
    assert runner_state(store, runner) == "claiming"


def test_heartbeat_just_past_the_timeout_is_dead(store, settings):
    job_id = submit(store, retries=0)
    runner = register(store)
    start(store, runner)
    age(store, runner, settings.heartbeat_timeout + 2)

    assert rescue_once(store, settings, BOOT) == 1
    assert store.job_get(job_id).status == Status.ABANDONED


@pytest.mark.skipif(BOOT is None, reason="no boot id on this system")
def test_runner_of_this_node_whose_pid_is_gone_is_dead_at_once(store, settings):
    job_id = submit(store, retries=1)
    runner = register(store, settings.node, pid=gone_pid(), boot=BOOT)
    assert start_ids(store, runner, settings.node) == [job_id]

    assert rescue_once(store, settings, BOOT) == 1  # no waiting for the timeout
    job = store.job_get(job_id)
    assert job.status == Status.PENDING and f"runner {runner}" in job.error
    assert crashes(store, job_id) == 1   # its own crash counts
    assert runner_state(store, runner) == "dead"


@pytest.mark.skipif(BOOT is None, reason="no boot id on this system")
def test_runner_of_this_node_whose_pid_exists_is_left_alone(store, settings):
    job_id = submit(store, retries=0)
    runner = register(store, settings.node, pid=os.getppid(), boot=BOOT)
    start(store, runner, settings.node)

    assert rescue_once(store, settings, BOOT) == 0
    assert store.job_get(job_id).status == Status.RUNNING
    assert runner_state(store, runner) == "claiming"


def test_same_pid_on_another_node_is_judged_by_heartbeat_only(store, settings):
    job_id = submit(store, retries=0)
    runner = register(store, OTHER, pid=gone_pid(), boot=BOOT)
    start(store, runner)

    assert rescue_once(store, settings, BOOT) == 0
    assert store.job_get(job_id).status == Status.RUNNING


def test_rescuer_never_rescues_itself(store, settings):
    job_id = submit(store, retries=0)
    runner = register(store)
    start(store, runner)
    age(store, runner)

    assert rescue_once(store, settings, BOOT, my_runner_id=runner) == 0
    assert store.job_get(job_id).status == Status.RUNNING


def test_runners_that_exited_are_not_rescued(store, settings):
    runner = register(store)
    store.runner_set_state(runner, "exited")
    age(store, runner)
    assert rescue_once(store, settings, BOOT) == 0
    assert runner_state(store, runner) == "exited"


# -- two rescuers ---------------------------------------------------------------------


def test_two_rescuers_at_once_only_one_rescues(store, settings):
    ids = [submit(store, retries=1) for _ in range(3)] + [submit(store, retries=0)]
    runner = register(store)
    assert sorted(start_ids(store, runner)) == sorted(ids)
    age(store, runner)

    stores = [open_store(settings) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list = [None, None]

    def rescue(index: int) -> None:
        barrier.wait()
        results[index] = stores[index].runner_rescue(runner, f"runner {runner} died", 3, True)

    threads = [threading.Thread(target=rescue, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for other in stores:
            other.dispose()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert sorted(winners[0]["retried"]) == sorted(ids[:3])
    assert winners[0]["abandoned"] == [ids[3]]
    assert store.runner_rescue(runner, "again", 3, True) is None
    assert all(crashes(store, i) == 1 for i in ids)  # counted once, not twice
    assert runner_state(store, runner) == "dead"


# -- runjobs runners ---------------------------------------------------------------------


def test_runners_json_shows_a_runner_without_heartbeat_dead(store, settings, environ):
    dead, alive = register(store), register(store, "node-y")
    job_id = submit(store, retries=0)
    assert start_ids(store, dead) == [job_id]
    age(store, dead)

    result = cli(environ, "runners", "--json")
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in json.loads(result.stdout)}
    assert by_id[dead]["state"] == "dead" and by_id[dead]["jobs"] == [job_id]
    assert by_id[dead]["heartbeat_age"] >= 590
    assert by_id[alive]["state"] == "claiming" and by_id[alive]["heartbeat_age"] < 30

    rescue_once(store, settings, BOOT)
    by_id = {r["id"]: r for r in json.loads(cli(environ, "runners", "--json").stdout)}
    assert by_id[dead]["state"] == "dead" and by_id[dead]["jobs"] == []


def test_runner_declared_dead_that_comes_back_claims_nothing(store, settings):
    first = submit(store, retries=1)
    runner = register(store)
    assert start_ids(store, runner) == [first]
    age(store, runner)
    assert rescue_once(store, settings, BOOT) == 1
    # It was only cut off; it heartbeats again, but its jobs went to others:
    # a claim by it could never be rescued again, so it gets nothing.
    store.runner_heartbeat(runner)
    later = submit(store, retries=0)
    assert start_ids(store, runner) == []
    assert store.job_get(later).status == Status.PENDING
    assert sorted(start_ids(store, register(store, "node-y"), "node-y")) == sorted([first, later])


def test_a_heartbeat_that_arrives_before_the_rescue_is_written_saves_the_runner(store, settings):
    runner = register(store)
    job = submit(store, retries=1)
    assert start_ids(store, runner) == [job]
    # The rescuer read an old heartbeat, then the runner beat again: the
    # rescue, re-checked in its own statement, does not happen.
    assert store.runner_rescue(runner, "stale read", 3, True,
                               stale_after=settings.heartbeat_timeout) is None
    assert runner_state(store, runner) == "claiming"
    assert store.job_get(job).status is Status.RUNNING
    age(store, runner)
    assert store.runner_rescue(runner, "really dead", 3, True,
                               stale_after=settings.heartbeat_timeout) is not None


def test_heartbeat_of_a_runner_declared_dead_writes_nothing_and_says_so(store, settings):
    runner = register(store)
    assert store.runner_heartbeat(runner) is True
    age(store, runner)
    rescue_once(store, settings, BOOT)
    assert store.runner_heartbeat(runner) is False
    store.runner_set_state(runner, "exited")  # a late exit does not revive it either
    assert runner_state(store, runner) == "dead"


# -- a dead runner's command: its process group ----------------------------------------


def command_group(runner_id: int, job_id: int) -> subprocess.Popen:
    """A command's process group as a runner starts it: its own session, the
    job's mark in its environment; its leader and a child of it sleep."""
    env = {**os.environ, MARKER: marker(runner_id, job_id)}
    return subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60; wait"], env=env,
                            start_new_session=True)


def group_pids(pgid: int) -> list[int]:
    """The living (not zombie) processes of group `pgid`."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as handle:
                state, _ppid, group = handle.read().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            pids.append(int(name))
    return pids


def recorded_group(store: Store, job_id: int) -> tuple:
    with store.engine.begin() as conn:
        return tuple(conn.execute(sa.select(jobs.c.pgid, jobs.c.pgid_runner)
                                  .where(jobs.c.id == job_id)).one())


@pytest.fixture
def groups():
    """Process groups started by a test, killed (and reaped) at its end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def running_command(store: Store, groups: list, node: str, pid: int | None = None,
                    mark_job: int | None = None) -> tuple[int, int, subprocess.Popen]:
    """A RUNNING job with retries whose runner (on `node`, this boot)
    recorded a live process group; (job id, runner id, its leader)."""
    job_id = submit(store, retries=1)
    runner = register(store, node, pid=pid, boot=BOOT)
    assert start_ids(store, runner, node) == [job_id]
    process = command_group(runner, mark_job or job_id)
    groups.append(process)
    wait_for(lambda: len(group_pids(process.pid)) == 3, message="the group's three processes")
    assert store.job_process_group(job_id, runner, process.pid)
    return job_id, runner, process


def test_rescuer_on_the_node_kills_the_dead_runners_group_then_retries_at_once(
        store, settings, groups):
    job_id, runner, process = running_command(store, groups, settings.node, pid=gone_pid())
    assert recorded_group(store, job_id) == (process.pid, runner)

    assert rescue_once(store, settings, BOOT) == 1
    assert group_pids(process.pid) == []
    job = store.job_get(job_id)
    assert job.status == Status.PENDING and job.run_at <= store.db_now()
    assert recorded_group(store, job_id) == (None, None)


def test_rescuer_on_another_host_holds_the_retry_for_the_grace_period(store, settings, groups):
    """The group runs on node-x: this host cannot see it, let alone kill it.
    The retry waits grace_period after the rescue (heartbeat_timeout + grace
    after the last heartbeat); the group's record stays for node-x."""
    job_id, runner, process = running_command(store, groups, OTHER)
    age(store, runner)
    before = store.db_now()

    assert rescue_once(store, settings, BOOT) == 1
    job = store.job_get(job_id)
    assert job.status == Status.PENDING
    held = (job.run_at - before).total_seconds()
    assert settings.grace_period <= held < settings.grace_period + 5, held
    assert len(group_pids(process.pid)) == 3  # not this host's to touch
    assert recorded_group(store, job_id) == (process.pid, runner)
    assert start_ids(store, register(store, "node-y"), "node-y") == []  # not due yet

    # node-x's next runner finds the group of its dead runner, kills it, and
    # the retry is due at once.
    rescue_once(store, settings.replace(node=OTHER), BOOT)
    assert group_pids(process.pid) == []
    assert store.job_get(job_id).run_at <= store.db_now()
    assert recorded_group(store, job_id) == (None, None)


def test_group_without_the_jobs_mark_is_never_killed(store, settings, groups):
    """The recorded pgid now names processes that do not carry the job's
    mark (a pid reused by someone else's group): they are left alone. No
    process of the job's is left, so its retry may start."""
    job_id, runner, process = running_command(store, groups, settings.node, pid=gone_pid(),
                                              mark_job=10**6)
    assert rescue_once(store, settings, BOOT) == 1
    assert len(group_pids(process.pid)) == 3
    job = store.job_get(job_id)
    assert job.status == Status.PENDING and job.run_at <= store.db_now()
    assert recorded_group(store, job_id) == (None, None)


def test_a_job_rescued_under_its_runner_records_no_group(store, settings):
    job_id = submit(store, retries=1)
    runner = register(store)
    assert start_ids(store, runner) == [job_id]
    age(store, runner)
    rescue_once(store, settings, BOOT)
    assert store.job_process_group(job_id, runner, 4242) is False
    assert recorded_group(store, job_id) == (None, None)


def test_poison_error_says_the_job_took_its_runner_down(store, settings):
    job = submit(store, retries=5)
    for _ in range(3):
        crash_once(store, settings, job)
    assert "took its runner down 3 times in a row" in store.job_get(job).error


def test_reconcile_puts_back_what_a_lost_answer_left_behind(store):
    """A round (or, in older versions, a claim) committed but its answer
    was lost: the runner runs none of these jobs, so once the database is
    back they go back."""
    runner = register(store, node=OTHER)
    queued, running, canceling, kept = (submit(store) for _ in range(4))
    queue_directly(store, runner, [queued], OTHER)
    assert start_ids(store, runner) == [running, canceling, kept]
    store.job_cancel(canceling)
    assert store.jobs_reconcile(runner, [kept]) == 3
    assert store.job_get(queued).status is Status.PENDING
    back = store.job_get(running)
    assert (back.status, back.attempt, back.runner_id) == (Status.PENDING, 0, None)
    assert store.job_get(canceling).status is Status.CANCELED
    assert store.job_get(kept).status is Status.RUNNING
