"""The queue's contract, run against a real SQLite file and a real PostgreSQL.

Every test talks to the store the way the runner and the CLI do: jobs are
claimed and started by `runner_round`, the runner's one claim path. Only a
job left QUEUED (claimed, never started), which no store call leaves, is
written directly (`queue_directly`). Times in the past or future are
relative to the store's own clock (`db_now`), so the tests do not depend on
the host and the database agreeing.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3

import pytest
import sqlalchemy as sa

from runjobs.config import load_settings
from runjobs.errors import Conflict, NotFound, StoreError
from runjobs.models import Job, JobSpec, Outcome, Status
from runjobs.store import Store, open_store
from tests.conftest import is_postgres, queue_directly, write_config

CAPACITY = {"default": 10}
WITH_SCAN = {"default": 10, "scan": 1}
# PostgreSQL's round claims jobs with the default needs in its first
# statement and leaves the others to the fit in Python (which decides every
# claim on SQLite). A test parametrized by `needs` runs with plain jobs only
# ("plain") and with a job of the other kind among them ("mixed"): the same
# jobs must come out, in the same order, either way.
BY_NEEDS = pytest.mark.parametrize("needs", [None, {"default": 1, "scan": 1}],
                                   ids=["plain", "mixed"])


def submit(store: Store, action: str = "noop", **fields) -> int:
    return store.jobs_submit([JobSpec(action, **fields)])[0].id


def register(store: Store, node: str = "node-a") -> int:
    return store.runner_register(node, os.getpid(), None, None, "test")


def claim_jobs(store: Store, runner_id: int, node: str = "node-a", capacity=CAPACITY,
               limit: int | None = None, done=()) -> list[Job]:
    """One round as the runner does it: write the outcomes `done`, claim the
    due jobs that fit and start them (RUNNING). The jobs started, best first."""
    return store.runner_round(runner_id, node, capacity, list(done), claim=True, limit=limit)


def claim_ids(store: Store, runner_id: int, node: str = "node-a", capacity=CAPACITY,
              limit: int | None = None, done=()) -> list[int]:
    return [job.id for job in claim_jobs(store, runner_id, node, capacity, limit, done)]


def status(store: Store, job_id: int) -> Status:
    return store.job_get(job_id).status


def ago(store: Store, seconds: float) -> dt.datetime:
    return store.db_now() - dt.timedelta(seconds=seconds)


# -- submit -------------------------------------------------------------------------


def test_submit_returns_new_increasing_ids_for_pending_jobs(store):
    results = store.jobs_submit([JobSpec("noop"), JobSpec("sleep", {"seconds": 1})])
    more = store.jobs_submit([JobSpec("fail")])
    ids = [r.id for r in results + more]
    assert ids == sorted(set(ids)) and len(ids) == 3
    assert all(r.created for r in results + more)
    jobs = [store.job_get(i) for i in ids]
    assert [j.action for j in jobs] == ["noop", "sleep", "fail"]
    assert [j.status for j in jobs] == [Status.PENDING] * 3
    assert all(j.attempt == 0 and j.runner_id is None and j.created_at for j in jobs)


@BY_NEEDS
def test_submit_with_hold_is_held_and_never_claimed(store, needs):
    held = submit(store, hold=True, needs=needs)
    assert status(store, held) == Status.HELD
    assert claim_ids(store, register(store), capacity=WITH_SCAN) == []
    assert status(store, held) == Status.HELD


def test_submit_run_at_is_stored_as_the_same_instant_in_utc(store):
    at = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    job = store.job_get(submit(store, run_at=at))
    assert job.run_at == at
    assert job.run_at.utcoffset() == dt.timedelta(0)


def test_submit_without_run_at_is_due_now(store):
    before = store.db_now()
    job = store.job_get(submit(store))
    assert before - dt.timedelta(seconds=2) <= job.run_at <= store.db_now()


def test_submit_run_in_counts_from_the_database_clock(store):
    before = store.db_now()
    job = store.job_get(submit(store, run_in=600))
    after = store.db_now()
    assert before + dt.timedelta(seconds=599) <= job.run_at <= after + dt.timedelta(seconds=601)


def test_submit_params_round_trip_as_json(store):
    params = {"host": "db-1", "port": 5432, "ratio": 0.25, "dry": False, "none": None,
              "hosts": ["a", "b"], "nested": {"k": [1, {"x": "é ✓"}]}}
    assert store.job_get(submit(store, params=params)).params == params
    assert store.job_get(submit(store)).params == {}


def test_submit_stores_every_option(store):
    max_start = store.db_now() + dt.timedelta(hours=1)
    job = store.job_get(submit(store, priority=7, max_start_at=max_start, timeout=12.5,
                               retries=3, needs={"scan": 1}, key="k1"))
    assert (job.priority, job.max_start_at, job.timeout, job.retries, job.needs, job.key) == (
        7, max_start, 12.5, 3, {"scan": 1}, "k1")
    assert store.job_get(submit(store)).needs == {"default": 1}


# -- claim --------------------------------------------------------------------------


def submit_out_of_order(store: Store, needs: dict[str, int] | None) -> list[int]:
    """Six due jobs submitted out of claim order; their ids in claim order.
    The second in that order gets `needs`."""
    base = ago(store, 100)
    at = lambda s: base + dt.timedelta(seconds=s)  # noqa: E731
    low_old = submit(store, priority=0, run_at=at(0))
    high_late = submit(store, priority=5, run_at=at(50))
    high_early = submit(store, priority=5, run_at=at(10))
    low_old_twin = submit(store, priority=0, run_at=at(0))
    negative = submit(store, priority=-1, run_at=at(-50))
    high_early_twin = submit(store, priority=5, run_at=at(10), needs=needs)
    return [high_early, high_early_twin, high_late, low_old, low_old_twin, negative]


@BY_NEEDS
def test_claim_order_is_priority_then_run_at_then_id(store, needs):
    expected = submit_out_of_order(store, needs)
    runner = register(store)
    one_by_one = [claim_ids(store, runner, capacity=WITH_SCAN, limit=1) for _ in expected]
    assert one_by_one == [[i] for i in expected]
    assert claim_ids(store, runner, capacity=WITH_SCAN) == []


@BY_NEEDS
def test_one_round_takes_the_best_jobs_that_fit_in_claim_order(store, needs):
    expected = submit_out_of_order(store, needs)
    assert claim_ids(store, register(store), capacity={"default": 4, "scan": 1}) == expected[:4]
    other = register(store, "node-b")
    assert claim_ids(store, other, "node-b", WITH_SCAN) == expected[4:]


def test_round_returns_jobs_best_first_and_starts_them_with_attempt_one(store):
    base = ago(store, 10)
    ids = [submit(store, priority=p, run_at=base) for p in (1, 3, 2)]
    runner = register(store)
    started = claim_jobs(store, runner)
    assert [j.id for j in started] == [ids[1], ids[2], ids[0]]
    for job in started:
        assert (job.status, job.attempt, job.runner_id, job.node) == (
            Status.RUNNING, 1, runner, "node-a")
        stored = store.job_get(job.id)
        assert (stored.status, stored.attempt, stored.runner_id, stored.node) == (
            Status.RUNNING, 1, runner, "node-a")
        assert stored.queued_at is not None and stored.started_at is not None


@BY_NEEDS
def test_claim_takes_only_due_jobs(store, needs):
    due = submit(store, run_at=ago(store, 1))
    later = submit(store, run_in=3600, needs=needs)
    scheduled = submit(store, run_at=store.db_now() + dt.timedelta(minutes=5), needs=needs)
    runner = register(store)
    assert claim_ids(store, runner, capacity=WITH_SCAN) == [due]
    assert status(store, later) == status(store, scheduled) == Status.PENDING


@BY_NEEDS
def test_claim_skips_jobs_past_their_max_start(store, needs):
    expired = submit(store, run_at=ago(store, 60), max_start_at=ago(store, 30), needs=needs)
    fresh = submit(store, run_at=ago(store, 60), max_start_at=store.db_now() + dt.timedelta(hours=1))
    assert claim_ids(store, register(store), capacity=WITH_SCAN) == [fresh]
    assert status(store, expired) == Status.PENDING


def test_claim_limit_caps_the_number_of_jobs(store):
    ids = [submit(store) for _ in range(5)]
    runner = register(store)
    assert claim_ids(store, runner, limit=2) == ids[:2]
    assert claim_ids(store, runner, limit=None) == ids[2:]


def test_claim_stops_at_free_capacity(store):
    ids = [submit(store) for _ in range(5)]
    runner = register(store)
    capacity = {"default": 3}
    first = claim_jobs(store, runner, capacity=capacity)
    assert [j.id for j in first] == ids[:3]
    assert claim_ids(store, runner, capacity=capacity) == []
    # The node's use is counted from its jobs: one ends, one slot is free.
    assert claim_ids(store, runner, capacity=capacity,
                     done=[(first[0], Outcome(Status.SUCCESS), None)]) == [ids[3]]


def test_capacity_counts_other_runners_jobs_on_the_same_node(store):
    ids = [submit(store) for _ in range(6)]
    old_runner, new_runner, elsewhere = register(store), register(store), register(store, "node-b")
    capacity = {"default": 3}

    (running,) = claim_jobs(store, old_runner, capacity=capacity, limit=1)
    queue_directly(store, old_runner, [ids[1]], "node-a")  # one RUNNING, one QUEUED
    assert claim_ids(store, new_runner, capacity=capacity) == [ids[2]]
    assert claim_ids(store, new_runner, capacity=capacity) == []

    # Another node has its own capacity.
    assert claim_ids(store, elsewhere, "node-b", capacity) == ids[3:6]

    # A job being canceled still holds its share until its runner stops it.
    store.job_cancel(running.id)
    assert status(store, running.id) == Status.TO_CANCEL
    assert claim_ids(store, new_runner, capacity=capacity) == []

    # Finishing frees it, for any runner on the node.
    store.jobs_finish(old_runner, [(running, Outcome(Status.FAILURE), None)])
    store.jobs_unclaim(old_runner)
    submit(store)
    assert len(claim_ids(store, new_runner, capacity=capacity)) == 2


def test_job_needing_a_named_resource_waits_until_it_is_free(store):
    scan1 = submit(store, needs={"scan": 1}, priority=2)
    scan2 = submit(store, needs={"scan": 1}, priority=1)
    plain = submit(store)
    runner = register(store)
    capacity = {"default": 4, "scan": 1}

    first = claim_jobs(store, runner, capacity=capacity)
    assert [j.id for j in first] == [scan1, plain]
    assert claim_ids(store, runner, capacity=capacity) == []
    assert status(store, scan2) == Status.PENDING

    assert claim_ids(store, runner, capacity=capacity,
                     done=[(first[0], Outcome(Status.SUCCESS), None)]) == [scan2]


def test_job_needing_a_resource_the_node_lacks_is_never_claimed(store):
    gpu = submit(store, needs={"gpu": 1})
    plain = submit(store)
    assert claim_ids(store, register(store), capacity={"default": 4}) == [plain]
    assert status(store, gpu) == Status.PENDING


def test_job_that_does_not_fit_is_skipped_for_smaller_ones_behind_it(store):
    big = submit(store, needs={"default": 3}, priority=9)
    small = [submit(store) for _ in range(3)]
    runner = register(store)
    capacity = {"default": 2}
    assert claim_ids(store, runner, capacity=capacity) == small[:2]
    assert status(store, big) == Status.PENDING

    # Once the node is idle the big job still does not fit a 2-slot node,
    # but it fits a larger one, and then goes first.
    other = register(store, "node-b")
    assert claim_ids(store, other, "node-b", {"default": 4}) == [big, small[2]]


def test_multi_resource_needs_must_all_fit(store):
    both = submit(store, needs={"default": 1, "io": 2}, priority=5)
    io_only = submit(store, needs={"io": 1})
    runner = register(store)
    # io=2 is not free (only 1), so `both` is skipped; io_only fits.
    assert claim_ids(store, runner, capacity={"default": 4, "io": 1}) == [io_only]
    assert status(store, both) == Status.PENDING


# -- the fit: plain jobs and jobs with other needs in one round ----------------------


def test_round_takes_jobs_with_other_needs_in_their_place(store):
    a, b = submit(store), submit(store)
    gpu = submit(store, needs={"gpu": 1})
    c, d = submit(store), submit(store)
    big = submit(store, needs={"default": 3})
    e = submit(store)
    runner = register(store)
    # a, b: 2 of 5 default slots; gpu: the gpu; c, d: 4 of 5; big needs 3 of
    # the 1 left and waits; e: the last slot. In the queue's order.
    assert claim_ids(store, runner, capacity={"default": 5, "gpu": 1}) == [a, b, gpu, c, d, e]
    assert status(store, big) == Status.PENDING


def test_round_counts_the_nodes_jobs_with_other_needs(store):
    wide = submit(store, needs={"default": 3}, priority=5)
    plain = [submit(store) for _ in range(4)]
    runner, draining = register(store), register(store)
    assert claim_ids(store, draining, capacity={"default": 4}) == [wide, plain[0]]
    # The node is full, whichever of its runners asks.
    assert claim_ids(store, runner, capacity={"default": 4}) == []
    # The wide job ends: its 3 slots are free again.
    wide_job = store.job_get(wide)
    assert claim_ids(store, draining, capacity={"default": 4},
                     done=[(wide_job, Outcome(Status.SUCCESS), None)]) == plain[1:]
    assert status(store, wide) == Status.SUCCESS


def test_round_fills_only_free_slots_and_keeps_to_its_limit(store):
    ids = [submit(store) for _ in range(10)]
    runner = register(store)
    first = claim_jobs(store, runner, capacity={"default": 4}, limit=3)
    assert [job.id for job in first] == ids[:3]
    # One of three ends: 2 of 4 slots are free.
    assert claim_ids(store, runner, capacity={"default": 4},
                     done=[(first[0], Outcome(Status.SUCCESS), None)]) == ids[3:5]
    assert claim_ids(store, runner, capacity={"default": 4}) == []


def test_round_with_fewer_jobs_due_than_free_slots_takes_them_all(store):
    ids = [submit(store) for _ in range(3)]
    later = submit(store, run_in=3600)
    runner = register(store)
    assert claim_ids(store, runner, capacity={"default": 8}) == ids
    assert claim_ids(store, runner, capacity={"default": 8}) == []
    assert status(store, later) == Status.PENDING


# -- jobs a runner holds --------------------------------------------------------------


def test_round_never_takes_a_job_another_runner_holds(store):
    queued, running, scheduled = submit(store), submit(store), submit(store, run_in=3600)
    runner, intruder = register(store), register(store, "node-b")
    queue_directly(store, runner, [queued], "node-a")
    assert claim_ids(store, runner) == [running]
    assert claim_ids(store, intruder, "node-b") == []
    assert [status(store, i) for i in (queued, running, scheduled)] == [
        Status.QUEUED, Status.RUNNING, Status.PENDING]
    assert store.job_get(queued).attempt == 0
    assert store.job_get(queued).runner_id == store.job_get(running).runner_id == runner


def test_job_canceled_while_queued_is_never_started_and_ends_canceled(store):
    cancel = submit(store)
    runner = register(store)
    queue_directly(store, runner, [cancel], "node-a")
    assert store.job_cancel(cancel) == Status.TO_CANCEL
    assert claim_ids(store, runner) == []
    store.jobs_unclaim(runner)  # at its deadline
    job = store.job_get(cancel)
    assert job.status == Status.CANCELED and job.started_at is None
    assert job.finished_at is not None and job.attempt == 0


# -- finish ----------------------------------------------------------------------------


def test_finish_a_batch_of_successes(store):
    ids = [submit(store) for _ in range(4)]
    runner = register(store)
    jobs = claim_jobs(store, runner)
    written = store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None) for job in jobs])
    assert sorted(written) == ids
    for job_id in ids:
        job = store.job_get(job_id)
        assert job.status == Status.SUCCESS and job.finished_at is not None
        assert job.output is None and job.error is None


def test_finish_mixed_outcomes_with_output_and_error(store):
    ids = [submit(store) for _ in range(3)]
    runner = register(store)
    jobs = {j.id: j for j in claim_jobs(store, runner)}
    written = store.jobs_finish(runner, [
        (jobs[ids[0]], Outcome(Status.WARNING, output="3 hosts skipped", error="host-4 down"), None),
        (jobs[ids[1]], Outcome(Status.FAILURE, error="Traceback: boom"), None),
        (jobs[ids[2]], Outcome(Status.SUCCESS, output="ok", peak_rss_kb=2048), None),
    ])
    assert sorted(written) == ids
    warned, failed, done = (store.job_get(i) for i in ids)
    assert (warned.status, warned.output, warned.error) == (
        Status.WARNING, "3 hosts skipped", "host-4 down")
    assert (failed.status, failed.output, failed.error) == (Status.FAILURE, None, "Traceback: boom")
    assert (done.status, done.output, done.peak_rss_kb) == (Status.SUCCESS, "ok", 2048)


def test_finish_with_retry_goes_back_to_pending_later_keeping_attempt_and_error(store):
    job_id = submit(store, retries=2)
    runner = register(store)
    (job,) = claim_jobs(store, runner)
    before = store.db_now()
    written = store.jobs_finish(runner, [(job, Outcome(Status.FAILURE, error="boom"), 300)])
    assert written == [job_id]
    retried = store.job_get(job_id)
    assert retried.status == Status.PENDING
    assert retried.attempt == 1
    assert retried.error == "boom"
    assert retried.runner_id is None and retried.node is None and retried.finished_at is None
    assert before + dt.timedelta(seconds=299) <= retried.run_at <= store.db_now() + dt.timedelta(
        seconds=301)
    # Not due yet.
    assert claim_ids(store, runner) == []


def test_retried_job_runs_again_with_attempt_raised(store):
    job_id = submit(store, retries=1)
    runner = register(store)
    (job,) = claim_jobs(store, runner)
    store.jobs_finish(runner, [(job, Outcome(Status.FAILURE, error="first"), 0)])
    (again,) = claim_jobs(store, runner)
    assert (again.id, again.attempt) == (job_id, 2)
    store.jobs_finish(runner, [(again, Outcome(Status.SUCCESS), None)])
    assert store.job_get(job_id).status == Status.SUCCESS


def test_job_being_canceled_that_fails_ends_canceled_and_is_never_retried(store):
    retry_asked, plain = submit(store, retries=5), submit(store)
    runner = register(store)
    jobs = {j.id: j for j in claim_jobs(store, runner)}
    assert store.job_cancel(retry_asked) == Status.TO_CANCEL
    assert store.job_cancel(plain) == Status.TO_CANCEL
    written = store.jobs_finish(runner, [
        (jobs[retry_asked], Outcome(Status.FAILURE, error="interrupted"), 0),
        (jobs[plain], Outcome(Status.FAILURE, error="interrupted"), None),
    ])
    assert sorted(written) == [retry_asked, plain]
    for job_id in (retry_asked, plain):
        job = store.job_get(job_id)
        assert job.status == Status.CANCELED and job.finished_at is not None
        assert job.attempt == 1
    assert claim_ids(store, runner) == []


def test_finish_from_another_runner_writes_nothing(store):
    job_id = submit(store)
    owner, other = register(store), register(store)
    (job,) = claim_jobs(store, owner)
    assert store.jobs_finish(other, [(job, Outcome(Status.SUCCESS, output="x"), None)]) == []
    assert store.jobs_finish(other, [(job, Outcome(Status.FAILURE, error="x"), 0)]) == []
    after = store.job_get(job_id)
    assert after.status == Status.RUNNING and after.runner_id == owner
    assert after.output is None and after.error is None and after.finished_at is None
    # The owner still can.
    assert store.jobs_finish(owner, [(job, Outcome(Status.SUCCESS), None)]) == [job_id]


def test_finish_twice_writes_once(store):
    job_id = submit(store)
    runner = register(store)
    (job,) = claim_jobs(store, runner)
    assert store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None)]) == [job_id]
    assert store.jobs_finish(runner, [(job, Outcome(Status.FAILURE, error="late"), None)]) == []
    assert store.job_get(job_id).status == Status.SUCCESS
    assert store.job_get(job_id).error is None


def test_finish_of_a_job_never_started_writes_nothing(store):
    job_id = submit(store)
    runner = register(store)
    queue_directly(store, runner, [job_id], "node-a")
    job = store.job_get(job_id)
    assert store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None)]) == []
    assert status(store, job_id) == Status.QUEUED


# -- unclaim ----------------------------------------------------------------------------


def test_unclaim_puts_back_queued_jobs_but_not_running_ones(store):
    ids = [submit(store) for _ in range(3)]
    runner = register(store)
    assert claim_ids(store, runner, limit=1) == ids[:1]
    queue_directly(store, runner, ids[1:], "node-a")
    assert store.jobs_unclaim(runner) == 2
    assert status(store, ids[0]) == Status.RUNNING
    for job_id in ids[1:]:
        job = store.job_get(job_id)
        assert job.status == Status.PENDING
        assert job.runner_id is None and job.node is None and job.queued_at is None
    # Back in the queue for anyone.
    assert claim_ids(store, register(store)) == ids[1:]


def test_unclaim_only_the_given_ids_and_only_this_runners(store):
    ids = [submit(store) for _ in range(3)]
    runner, other = register(store), register(store)
    queue_directly(store, runner, ids[:2], "node-a")
    queue_directly(store, other, ids[2:], "node-a")
    assert store.jobs_unclaim(runner, [ids[0]]) == 1
    assert [status(store, i) for i in ids] == [Status.PENDING, Status.QUEUED, Status.QUEUED]
    assert store.jobs_unclaim(runner, [ids[2]]) == 0
    assert status(store, ids[2]) == Status.QUEUED


def test_unclaim_ends_a_job_canceled_before_it_started_canceled(store):
    canceled, kept = submit(store), submit(store)
    runner = register(store)
    queue_directly(store, runner, [canceled, kept], "node-a")
    store.job_cancel(canceled)
    assert store.jobs_unclaim(runner) == 1
    assert status(store, kept) == Status.PENDING
    job = store.job_get(canceled)
    assert job.status == Status.CANCELED and job.finished_at is not None


def test_unclaim_leaves_a_running_job_being_canceled_to_its_runner(store):
    job_id = submit(store)
    runner = register(store)
    claim_jobs(store, runner)
    store.job_cancel(job_id)
    assert store.jobs_unclaim(runner) == 0
    assert status(store, job_id) == Status.TO_CANCEL


# -- cancel -------------------------------------------------------------------------------


def test_cancel_pending_and_held_jobs_at_once(store):
    pending, held = submit(store), submit(store, hold=True)
    assert store.job_cancel(pending) == Status.CANCELED
    assert store.job_cancel(held) == Status.CANCELED
    for job_id in (pending, held):
        job = store.job_get(job_id)
        assert job.status == Status.CANCELED and job.finished_at is not None
    assert claim_ids(store, register(store)) == []


def test_cancel_queued_or_running_asks_the_runner(store):
    queued, running = submit(store), submit(store)
    runner = register(store)
    queue_directly(store, runner, [queued], "node-a")
    assert claim_ids(store, runner) == [running]
    assert store.job_cancel(queued) == Status.TO_CANCEL
    assert store.job_cancel(running) == Status.TO_CANCEL
    assert status(store, queued) == status(store, running) == Status.TO_CANCEL
    assert sorted(store.jobs_canceling(runner)) == [queued, running]
    # Asking again is harmless.
    assert store.job_cancel(running) == Status.TO_CANCEL


def test_cancel_a_final_job_is_a_conflict(store):
    job_id = submit(store)
    runner = register(store)
    (job,) = claim_jobs(store, runner)
    store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None)])
    with pytest.raises(Conflict, match="SUCCESS"):
        store.job_cancel(job_id)
    assert status(store, job_id) == Status.SUCCESS


def test_cancel_a_missing_job_is_not_found(store):
    with pytest.raises(NotFound, match="424242"):
        store.job_cancel(424242)
    with pytest.raises(NotFound):
        store.job_get(424242)


# -- expire ---------------------------------------------------------------------------------


def test_expire_pending_jobs_past_their_max_start(store):
    late = submit(store, run_at=ago(store, 60), max_start_at=ago(store, 1))
    queued_late = submit(store, run_at=ago(store, 60), max_start_at=ago(store, 1))
    started = submit(store, max_start_at=store.db_now() + dt.timedelta(seconds=30))
    runner = register(store)
    queue_directly(store, runner, [queued_late], "node-a")  # claimed before its max start
    assert claim_ids(store, runner) == [started]
    in_time = submit(store, max_start_at=store.db_now() + dt.timedelta(hours=1))
    unbounded = submit(store)

    assert store.jobs_expire() == 1
    job = store.job_get(late)
    assert job.status == Status.EXPIRED and job.finished_at is not None and job.error
    assert status(store, queued_late) == Status.QUEUED
    assert status(store, started) == Status.RUNNING
    assert status(store, in_time) == status(store, unbounded) == Status.PENDING
    assert store.jobs_expire() == 0


# -- idempotent key ---------------------------------------------------------------------------


def test_same_key_while_open_returns_the_same_job(store):
    (first,) = store.jobs_submit([JobSpec("noop", {"a": 1}, key="nightly")])
    (same,) = store.jobs_submit([JobSpec("noop", {"a": 1}, key="nightly")])
    (other_params,) = store.jobs_submit([JobSpec("noop", {"a": 2}, key="nightly")])
    assert first.created and not first.params_differ
    assert (same.id, same.created, same.params_differ) == (first.id, False, False)
    assert (other_params.id, other_params.created, other_params.params_differ) == (
        first.id, False, True)
    # The existing job is unchanged.
    assert store.job_get(first.id).params == {"a": 1}
    assert len(store.jobs_list()) == 1


def test_same_key_is_the_same_job_while_queued_and_running(store):
    job_id = submit(store, key="k")
    runner = register(store)
    queue_directly(store, runner, [job_id], "node-a")
    assert store.jobs_submit([JobSpec("noop", key="k")])[0].id == job_id
    store.jobs_unclaim(runner)
    (job,) = claim_jobs(store, runner)
    assert store.jobs_submit([JobSpec("noop", key="k")])[0].id == job_id
    store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None)])
    again = store.jobs_submit([JobSpec("noop", key="k")])[0]
    assert again.created and again.id != job_id


def test_same_key_after_the_job_is_final_creates_a_new_job(store):
    job_id = submit(store, key="k")
    store.job_cancel(job_id)
    again = store.jobs_submit([JobSpec("noop", {"b": 2}, key="k")])[0]
    assert again.created and again.id > job_id
    assert store.job_get(again.id).params == {"b": 2}
    # And the key now names the new job.
    assert store.jobs_submit([JobSpec("noop", key="k")])[0].id == again.id


def test_same_key_twice_in_one_batch_is_one_job(store):
    results = store.jobs_submit([JobSpec("noop", {"a": 1}, key="k"), JobSpec("noop"),
                                 JobSpec("noop", {"a": 2}, key="k")])
    assert results[0].created and results[1].created
    assert (results[2].id, results[2].created, results[2].params_differ) == (
        results[0].id, False, True)
    assert len(store.jobs_list()) == 2


# -- timeline -----------------------------------------------------------------------------------


def timeline(store: Store, job_id: int) -> list[tuple]:
    events = store.job_events(job_id)
    times = [e.at for e in events]
    assert times == sorted(times), "timeline out of order"
    return [(e.status, e.previous, e.runner_id, e.attempt) for e in events]


def test_timeline_of_a_job_that_runs_and_succeeds(store):
    job_id = submit(store)
    runner = register(store)
    (job,) = claim_jobs(store, runner)
    store.job_progress(job_id, 1, 2, "half")  # not a status change: no event
    store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None)])
    assert timeline(store, job_id) == [
        (Status.PENDING, None, None, 0),
        (Status.QUEUED, Status.PENDING, runner, 0),
        (Status.RUNNING, Status.QUEUED, runner, 1),
        (Status.SUCCESS, Status.RUNNING, runner, 1),
    ]
    events = store.job_events(job_id)
    job = store.job_get(job_id)
    assert [e.at for e in events] == [job.created_at, job.queued_at, job.started_at,
                                      job.finished_at]


def test_timeline_of_a_job_that_is_retried(store):
    job_id = submit(store, retries=1)
    first, second = register(store), register(store)
    (job,) = claim_jobs(store, first)
    store.jobs_finish(first, [(job, Outcome(Status.FAILURE, error="boom"), 0)])
    (job,) = claim_jobs(store, second)
    store.jobs_finish(second, [(job, Outcome(Status.FAILURE, error="boom again"), None)])
    assert timeline(store, job_id) == [
        (Status.PENDING, None, None, 0),
        (Status.QUEUED, Status.PENDING, first, 0),
        (Status.RUNNING, Status.QUEUED, first, 1),
        (Status.PENDING, Status.RUNNING, None, 1),
        (Status.QUEUED, Status.PENDING, second, 1),
        (Status.RUNNING, Status.QUEUED, second, 2),
        (Status.FAILURE, Status.RUNNING, second, 2),
    ]
    notes = [e.note for e in store.job_events(job_id)]
    assert notes[3] == "boom" and notes[6] == "boom again"


def test_timeline_of_held_released_and_canceled_jobs(store):
    held = submit(store, hold=True)
    store.job_cancel(held)
    queued = submit(store)
    runner = register(store)
    queue_directly(store, runner, [queued], "node-a")
    store.job_cancel(queued)
    store.jobs_unclaim(runner)
    assert timeline(store, held) == [
        (Status.HELD, None, None, 0),
        (Status.CANCELED, Status.HELD, None, 0),
    ]
    assert timeline(store, queued) == [
        (Status.PENDING, None, None, 0),
        (Status.QUEUED, Status.PENDING, runner, 0),
        (Status.TO_CANCEL, Status.QUEUED, runner, 0),
        (Status.CANCELED, Status.TO_CANCEL, runner, 0),
    ]


def test_timeline_of_an_unclaimed_and_an_expired_job(store):
    job_id = submit(store, max_start_at=store.db_now() + dt.timedelta(seconds=60))
    runner = register(store)
    queue_directly(store, runner, [job_id], "node-a")
    store.jobs_unclaim(runner)
    late = submit(store, max_start_at=ago(store, 1))
    store.jobs_expire()
    assert timeline(store, job_id) == [
        (Status.PENDING, None, None, 0),
        (Status.QUEUED, Status.PENDING, runner, 0),
        (Status.PENDING, Status.QUEUED, None, 0),
    ]
    assert timeline(store, late) == [
        (Status.PENDING, None, None, 0),
        (Status.EXPIRED, Status.PENDING, None, 0),
    ]


def test_sqlite_writer_lock_held_past_the_busy_timeout_is_a_store_error(tmp_path):
    """SQLite takes the write lock at BEGIN (straight through the driver);
    another writer holding it past the busy timeout is a StoreError, as any
    database error is, and the store works again once it is let go."""
    home = tmp_path / "home"
    path = home / "runjobs.db"
    settings = load_settings({"RUNJOBS_HOME": str(home),
                              "RUNJOBS_CONFIG": str(write_config(home, ""))},
                             database_url=f"sqlite:///{path}")
    store = open_store(settings)

    @sa.event.listens_for(store.engine, "connect")
    def _short_busy_timeout(dbapi_conn, _record):
        dbapi_conn.execute("PRAGMA busy_timeout = 100")

    store.engine.dispose()  # new connections take the short timeout
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="database is locked"):
            store.jobs_submit([JobSpec("noop")])
        holder.rollback()
        (job,) = store.jobs_submit([JobSpec("noop")])
        assert store.job_status(job.id) == Status.PENDING
    finally:
        holder.close()
        store.dispose()


def test_a_round_failing_in_the_database_is_a_store_error_and_the_next_round_works(store):
    """The round runs its statements on the driver's cursor. A driver error
    there is a StoreError like any other, and a later round on a new
    connection writes the outcomes and claims on."""
    ids = [submit(store) for _ in range(4)]
    runner = register(store)
    started = store.runner_round(runner, "node-a", {"default": 2}, [], claim=True)
    assert [job.id for job in started] == ids[:2]
    done = [(job, Outcome(Status.SUCCESS), None) for job in started]
    _break_round_connection(store)
    with pytest.raises(StoreError, match="database error"):
        store.runner_round(runner, "node-a", {"default": 2}, done, claim=True)
    again = store.runner_round(runner, "node-a", {"default": 2}, done, claim=True)
    assert [job.id for job in again] == ids[2:]
    assert [status(store, job_id) for job_id in ids] == [Status.SUCCESS] * 2 + [Status.RUNNING] * 2


def _break_round_connection(store: Store) -> None:
    """Make every write on the round's own connection fail, while BEGIN and
    ROLLBACK still work: a new connection is unharmed."""
    driver = store._round_conn.connection.driver_connection
    if is_postgres(store):
        with driver.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        driver.commit()
    else:
        driver.execute("CREATE TEMP TRIGGER no_writes BEFORE UPDATE ON jobs "
                       "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_new_round_connection_prepares_the_rounds_statements_again(store):
    """PostgreSQL: prepared statements live in the session. When the round's
    connection is cut (a server restart, a proxy), the next round prepares
    on its new one instead of executing a name that session never saw."""
    ids = [submit(store) for _ in range(6)]
    runner = register(store)
    capacity = {"default": 2}
    started = store.runner_round(runner, "node-a", capacity, [], claim=True)
    done = [(job, Outcome(Status.SUCCESS), None) for job in started]
    started = store.runner_round(runner, "node-a", capacity, done, claim=True)  # prepares
    pid = store._round_conn.connection.driver_connection.get_backend_pid()
    with store.engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    done = [(job, Outcome(Status.SUCCESS), None) for job in started]
    with pytest.raises(StoreError, match="database error"):
        store.runner_round(runner, "node-a", capacity, done, claim=True)
    again = store.runner_round(runner, "node-a", capacity, done, claim=True)
    assert [job.id for job in again] == ids[4:]
    assert [status(store, job_id) for job_id in ids[:4]] == [Status.SUCCESS] * 4


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_pooled_connections_cut_under_a_submit_or_a_finish_are_dropped_quietly(store, caplog):
    """A single submit and a finish run on the driver's cursor too. When the
    server has cut their pooled connection, the call is one StoreError; the
    connection is dropped then and there, not reset by the pool (which
    logs a traceback to stderr, mailed by cron), and the next call works."""
    runner = register(store)
    job = store.jobs_submit([JobSpec("noop")])[0]
    started = store.runner_round(runner, "node-a", CAPACITY, [], claim=True)
    assert [j.id for j in started] == [job.id]
    caplog.set_level("WARNING")
    for call in (lambda: store.jobs_submit([JobSpec("noop")]),
                 lambda: store.jobs_finish(runner, [(started[0], Outcome(Status.SUCCESS), None)])):
        call()  # the pool now holds a connection that has prepared the statement
        killer = sa.create_engine(store.engine.url, poolclass=sa.pool.NullPool)
        with killer.begin() as conn:
            cut = conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid()")).all()
        killer.dispose()
        assert cut
        outcomes = []
        for _ in range(3):
            try:
                call()
                outcomes.append("ok")
            except StoreError:
                outcomes.append("error")
        assert outcomes[1:] == ["ok", "ok"], outcomes
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy")], caplog.text
