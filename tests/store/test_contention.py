"""Claims under real contention: several runners claim one queue at once.

Each thread or process registers its own runner on its own node and claims,
starts and finishes until the queue is empty, all released together by a
barrier. Every job must be claimed by exactly one of them. On SQLite this
rests on BEGIN IMMEDIATE plus the conditional update; on PostgreSQL on
FOR UPDATE SKIP LOCKED.
"""

from __future__ import annotations

import itertools
import time
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import is_postgres
from runjobs.models import JobSpec, Outcome, Status
from runjobs.capacity import needs_of
from runjobs.store import Store, open_store

WORKER = Path(__file__).resolve().parent / "claim_worker.py"

# (capacity per node, claim limit): unlimited capacity claims in small
# batches so the runners interleave; the limited one is DTR-style {default: 2}.
UNLIMITED = ({"default": 1000}, 8)
LIMITED = ({"default": 2}, None)


def fill(store: Store, count: int) -> list[int]:
    """`count` due jobs of mixed priority, a fifth of them needing two slots."""
    specs = [JobSpec("noop", {"n": n}, priority=n % 3,
                     needs={"default": 2} if n % 5 == 0 else None) for n in range(count)]
    return [s.id for s in store.jobs_submit(specs)]


def drain(store: Store, runner_id: int, node: str, capacity: dict[str, int],
          limit: int | None) -> list[int]:
    """Round after round, as a runner does it: each runner_round writes the
    last round's outcomes and claims and starts what fits, until no job is
    PENDING; the ids claimed."""
    claimed: list[int] = []
    running = []
    while True:
        done = [(job, Outcome(Status.SUCCESS), None) for job in running]
        running = store.runner_round(runner_id, node, capacity, done, claim=True, limit=limit)
        if not running:
            # Empty may mean "the others hold the rest locked".
            if not store.jobs_list([Status.PENDING], limit=1):
                return claimed
            continue
        # This node's only runner: all it uses is what it just started.
        used = sum(needs_of(job.needs)["default"] for job in running)
        assert used <= capacity["default"], "over capacity"
        assert limit is None or len(running) <= limit
        claimed += [job.id for job in running]
        time.sleep(0.002)  # the jobs' work: lets the other claimers in between rounds


def assert_each_claimed_once(store: Store, all_ids: list[int], claimed: list[list[int]]) -> None:
    assert sum(1 for ids in claimed if ids) >= 2, "no contention: one runner took everything"
    for one, other in itertools.combinations(claimed, 2):
        assert not set(one) & set(other), "a job was claimed by two runners"
    assert sorted(itertools.chain.from_iterable(claimed)) == sorted(all_ids)
    done = store.jobs_list([Status.SUCCESS], limit=len(all_ids) + 1)
    assert len(done) == len(all_ids)
    # Each job went through QUEUED exactly once.
    sample = all_ids[:: max(1, len(all_ids) // 20)]
    for job_id in sample:
        statuses = [e.status for e in store.job_events(job_id)]
        assert statuses == [Status.PENDING, Status.QUEUED, Status.RUNNING, Status.SUCCESS]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("capacity, limit", [UNLIMITED, LIMITED], ids=["unlimited", "capacity2"])
def test_threads_claim_each_job_exactly_once(store, capacity, limit):
    threads_count, jobs_count = 6, 480
    all_ids = fill(store, jobs_count)
    barrier = threading.Barrier(threads_count)
    claimed: list[list[int]] = [[] for _ in range(threads_count)]
    errors: list[BaseException] = []

    def claimer(index: int) -> None:
        try:
            node = f"node-{index}"
            runner_id = store.runner_register(node, os.getpid(), None, None, "test")
            barrier.wait(timeout=10)
            # runner_round keeps one connection for its loop's thread: a
            # store of its own per thread, as each runner process has.
            own = open_store(store.settings)
            try:
                claimed[index] = drain(own, runner_id, node, capacity, limit)
            finally:
                own.dispose()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=45)
    assert not any(t.is_alive() for t in threads), "a claimer hung"
    if errors:
        raise errors[0]
    assert_each_claimed_once(store, all_ids, claimed)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("capacity, limit", [UNLIMITED, LIMITED], ids=["unlimited", "capacity2"])
def test_processes_claim_each_job_exactly_once(store, environ, capacity, limit):
    processes_count, jobs_count = 4, 400
    all_ids = fill(store, jobs_count)
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), f"node-{i}", json.dumps(capacity),
                          json.dumps(limit)],
                         env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for i in range(processes_count)
    ]
    try:
        for proc in procs:  # the barrier: all have registered and wait
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        claimed = []
        for proc in procs:
            out, err = proc.communicate(timeout=45)
            assert proc.returncode == 0, err
            claimed.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert_each_claimed_once(store, all_ids, claimed)


def in_threads_at_once(count: int, work: Callable[[], None]) -> list[BaseException]:
    """`work` in `count` threads released together by a barrier; what they
    raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            work()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    workers = [threading.Thread(target=run) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return errors


def test_one_new_key_submitted_from_many_threads_at_once_makes_one_job(store):
    """Single submits of the same new key race between the check for an
    open job and the insert; the loser meets the unique index and, trying
    again, gets the winner's job. Every caller gets the one id, none an
    error."""
    keys = 25
    got: dict[str, set[int]] = {f"key-{n}": set() for n in range(keys)}

    def submit_all() -> None:
        for key in got:
            got[key].add(store.jobs_submit([JobSpec("noop", key=key)])[0].id)

    assert in_threads_at_once(6, submit_all) == []
    assert all(len(ids) == 1 for ids in got.values()), got
    assert len(store.jobs_list(limit=1000)) == keys


def test_single_submits_from_many_threads_share_the_kept_connection_safely(store):
    """A single submit runs on the connection the store keeps for it, or,
    while another thread uses that one, on one from the pool in autocommit.
    From six threads at once every submit stores its own job, and no pooled
    connection is handed back in autocommit: a later transaction on it
    would commit each statement by itself."""
    threads, each = 6, 150
    ids: list[int] = []

    def submit_all() -> None:
        ids.extend(store.jobs_submit([JobSpec("noop")])[0].id for _ in range(each))

    assert in_threads_at_once(threads, submit_all) == []
    assert len(set(ids)) == threads * each
    assert len(store.jobs_list([Status.PENDING], limit=10_000)) == threads * each
    if is_postgres(store):
        pooled = [store.engine.connect() for _ in range(threads)]
        try:
            assert [c.connection.driver_connection.autocommit for c in pooled] == [False] * threads
        finally:
            for conn in pooled:
                conn.close()
