"""The engine's workloads. Each function takes a fresh Db and a size and
returns one run's figures as a flat dict of numbers.

Runners are real processes (`python -m runjobs run` or bin/runjobs.sh), as
cron would start them; times of jobs come from the database (created_at,
queued_at, started_at, finished_at), which on PostgreSQL is the database's
clock and on SQLite the host's: the benchmark runs on the database's host, so
comparing them with the harness's time.time() is fair.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import runjobs

from .dbs import REPO, Db, finished_window, insert_finished, queue_noops, runjobs_cli, to_epoch
from .yardsticks import PlainInserts

DRAIN_TIMEOUT = 420          # seconds one `run --once` may take


def _client(db: Db) -> runjobs.Client:
    client = runjobs.connect(db.url)
    client.submit_many([])   # opens the store (and checks its schema) outside any timing
    return client


def _spawn(db: Db, argv: list[str], **env: str) -> tuple[subprocess.Popen, object]:
    """A runner process; its output goes to a file (a pipe nobody reads
    could fill and stall it)."""
    out = open(db.home / "runner.out", "ab")
    proc = subprocess.Popen(argv, env=db.env(**env), cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT)
    return proc, out


def _tail(db: Db) -> str:
    try:
        return (db.home / "runner.out").read_text(errors="replace")[-1500:]
    except OSError:
        return ""


def _final_counts(db: Db) -> dict[str, int]:
    return dict(db.query("SELECT status, COUNT(*) FROM jobs GROUP BY status"))


# -- drain ----------------------------------------------------------------------------

def drain(db: Db, jobs: int, preload: int = 0) -> dict[str, float]:
    """`jobs` noop jobs queued in bulk (dbs.queue_noops), then one `runjobs
    run --once` with 8 slots. `preload` finished jobs are inserted first
    (the growth workload).

    `jobs_per_s` runs from the runner's exec to its last job's finish, its
    start-up included, as cron sees it. `jobs_per_s_excl_startup` runs
    from its first claim, by the database's timestamps, as the plain drains
    are timed (yardsticks.plain_drain): the rate the paired ratios read."""
    if preload:
        insert_finished(db, preload)
    before = queue_noops(db, jobs)
    argv = [sys.executable, "-m", "runjobs", "run", "--once"]
    start = time.time()
    proc, out = _spawn(db, argv, RUNJOBS_CAPACITY="default=8")
    try:
        code = proc.wait(timeout=DRAIN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise RuntimeError(
            f"drain: runner still running after {DRAIN_TIMEOUT}s: {_tail(db)}") from None
    finally:
        out.close()
    exited = time.time()
    if code != 0:
        raise RuntimeError(f"drain: runner exited {code}: {_tail(db)}")
    done, first_start, last_finish = finished_window(db, before)
    if done != jobs:
        raise RuntimeError(f"drain: {done} of {jobs} jobs SUCCESS: {_final_counts(db)}")
    return {
        "jobs_per_s": jobs / (last_finish - start),
        "jobs_per_s_excl_startup": jobs / (last_finish - first_start),
        "startup_s": first_start - start,
        "process_wall_s": exited - start,
    }


# -- submit ---------------------------------------------------------------------------

def submit(db: Db, jobs: int, blocks: int = 5) -> dict[str, float]:
    """`jobs` single Client.submit calls (each its own transaction), in
    `blocks` turns with as many plain inserts (yardsticks.PlainInserts,
    into the same table); then `jobs` more through one `runjobs submit
    --batch -` process. `vs_plain` is this run's API rate over its plain one.

    The turns let the API's rate and the plain rate meet the machine in the
    same state: measured a minute apart, in the old ceiling workload, the
    plain rate of SQLite moved between 45,700 and 57,800/s from run to run
    while the API's stayed at 31,400-33,600/s."""
    client = _client(db)
    # Untimed: the first submit's one-time work (the store's kept connection,
    # compiling the insert, loading the actions) is not a submit's rate.
    client.submit("noop")
    plain = PlainInserts(db)
    api_s = plain_s = 0.0
    try:
        for block in range(blocks):
            size = jobs // blocks + (1 if block < jobs % blocks else 0)
            plain_s += plain.seconds(size)
            start = time.perf_counter()
            for _ in range(size):
                client.submit("noop")
            api_s += time.perf_counter() - start
    finally:
        plain.close()
        client.close()
    lines = "".join(json.dumps({"action": "noop"}) + "\n" for _ in range(jobs))
    start = time.perf_counter()
    result = runjobs_cli("submit", "--batch", "-", env=db.env(), input=lines, timeout=300)
    cli_s = time.perf_counter() - start
    ids = result.stdout.split()
    if len(ids) != jobs:
        raise RuntimeError(f"submit --batch printed {len(ids)} ids for {jobs} jobs")
    (count,), = db.query("SELECT COUNT(*) FROM jobs")
    if count != 3 * jobs + 1:
        raise RuntimeError(f"submit: {count} jobs stored, expected {3 * jobs + 1}")
    return {"api_per_s": jobs / api_s, "plain_insert_per_s": jobs / plain_s,
            "vs_plain": plain_s / api_s,
            "cli_batch_per_s": jobs / cli_s, "cli_batch_wall_s": cli_s}


# -- latency --------------------------------------------------------------------------

def _period_with_room(need: float) -> int:
    """A --period whose next deadline (boundary minus the 1 s margin) is at
    least `need` seconds away: the cycle's deadline is the wall clock's, so
    a runner started just before a boundary would stop claiming at once."""
    now = time.time()
    for period in range(600, 1800, 60):
        if period - now % period - 1 >= need:
            return period
    raise AssertionError("unreachable: 600 and 660 boundaries are 60 s apart at least")


def latency(db: Db, jobs: int, spacing: float = 0.05) -> dict[str, float]:
    """An idle runner in its cycle; `jobs` submits `spacing` apart from one
    Client; started_at - created_at of each, from the database."""
    client = _client(db)
    period = _period_with_room(jobs * spacing + 60)
    argv = [sys.executable, "-m", "runjobs", "run", "--period", str(period), "--margin", "1"]
    proc, out = _spawn(db, argv)
    try:
        _wait_for(lambda: db.query("SELECT 1 FROM runners WHERE state = 'claiming'"),
                  30, "latency: the runner did not register", db)
        time.sleep(1.0)  # past its first claim round: idle, waiting for work
        start = time.perf_counter()
        for n in range(jobs):
            # Keep to the schedule rather than sleeping a fixed gap after each.
            delay = start + n * spacing - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            client.submit("noop")
        _wait_for(lambda: db.query("SELECT COUNT(*) FROM jobs WHERE finished_at IS NOT NULL")
                  [0][0] == jobs, 60, "latency: jobs did not finish", db)
    finally:
        client.close()
        _stop(proc)
        out.close()
    rows = db.query("SELECT created_at, started_at FROM jobs WHERE started_at IS NOT NULL")
    waits = sorted(to_epoch(s) - to_epoch(c) for c, s in rows)
    return {"p50_ms": 1000 * _percentile(waits, 50), "p95_ms": 1000 * _percentile(waits, 95),
            "max_ms": 1000 * waits[-1], "period_s": period}


def _percentile(values: list[float], p: float) -> float:
    """Nearest rank: a value that was really measured."""
    rank = max(1, -(-len(values) * p // 100))
    return values[int(rank) - 1]


def _wait_for(check, timeout: float, message: str, db: Db) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{message} within {timeout}s: {_tail(db)}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the runner drains and exits), SIGKILL if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# -- cycle cost -------------------------------------------------------------------------

def _timed_script(db: Db, timeout: float = 60) -> tuple[float, float, float]:
    """bin/runjobs.sh --once from exec to exit: (exec time, wall s, peak RSS MB).

    The script execs python, so the child's pid is the runner's and wait4's
    ru_maxrss is the runner's peak (in KiB on Linux).
    """
    argv = [str(REPO / "bin" / "runjobs.sh"), "--once"]
    out = open(db.home / "runner.out", "ab")
    exec_at = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=db.env(), cwd=db.home, stdout=out, stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, proc.kill)  # os.wait4 itself has no timeout
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        out.close()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise RuntimeError(f"bin/runjobs.sh --once exited {proc.returncode}: {_tail(db)}")
    return exec_at, wall, usage.ru_maxrss / 1024


def cycle(db: Db) -> dict[str, float]:
    """An idle `bin/runjobs.sh --once` with nothing to do (wall, peak RSS),
    then one with a single due noop: exec to that job's queued_at."""
    _, idle_wall, idle_rss = _timed_script(db)
    client = _client(db)
    try:
        job_id = client.submit("noop")
    finally:
        client.close()
    exec_at, _, _ = _timed_script(db)
    (queued_at,), = db.query("SELECT queued_at FROM jobs WHERE id = %s", (job_id,))
    return {"idle_wall_s": idle_wall, "idle_peak_rss_mb": idle_rss,
            "first_claim_s": to_epoch(queued_at) - exec_at}
