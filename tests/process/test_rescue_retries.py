"""Retries, dead runners and lost databases with real runner processes.

Several "nodes" run on this one host: each has its own RUNJOBS_NODE and
RUNJOBS_HOME (so its own lock file and log) and all share one database.
Runner cycles are restarted as cron would restart them (`Cycles`), so a test
never depends on where in the minute it started.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import show_job as show, submit_job as submit, runjobs_cmd, wait_for, write_config
from runjobs.api import Client
from runjobs.config import load_settings
from runjobs.models import FINAL, Status
from runjobs.store import open_store

BASE_CONFIG = """
poll_interval = "0.1s"
heartbeat_interval = "0.5s"
heartbeat_timeout = "2s"
retry_backoff = "0.5s"
"""


# -- helpers ------------------------------------------------------------------------


def cycle_args(min_left: float, margin: int = 1) -> list[str]:
    """`--period P --margin M` for a cycle that lasts at least `min_left` s
    from now (a period whose next boundary is far enough away)."""
    now = time.time()
    for period in range(int(min_left) + margin + 2, 600):
        if period - now % period - margin >= min_left:
            return ["--period", f"{period}s", "--margin", f"{margin}s"]
    raise AssertionError("no period fits")


class Cycles:
    """Runs `runjobs run` cycles one after the other on one node, as cron
    would; every process is killed on exit."""

    def __init__(self, env: dict[str, str], min_left: float = 8.0) -> None:
        self.env, self.min_left = env, min_left
        self.processes: list[subprocess.Popen] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            process = subprocess.Popen(
                runjobs_cmd("run", *cycle_args(self.min_left)), env=self.env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.processes.append(process)
            while process.poll() is None and not self._stopped.wait(0.05):
                pass

    def __enter__(self) -> "Cycles":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stopped.set()
        self._thread.join(10)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def node_env(environ: dict[str, str], tmp_path: Path, node: str) -> dict[str, str]:
    """Another node: its own home and name, the same database and config."""
    home = tmp_path / f"home-{node}"
    home.mkdir(mode=0o700)
    return {**environ, "RUNJOBS_HOME": str(home), "RUNJOBS_NODE": node}


def configure(environ: dict[str, str], text: str) -> dict[str, str]:
    write_config(Path(environ["RUNJOBS_HOME"]), BASE_CONFIG + text)
    return environ


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def running_spans(events: list) -> list[tuple[int, dt.datetime, dt.datetime | None]]:
    """(runner id, from, to) for each stretch the timeline shows RUNNING."""
    spans = []
    for event, after in zip(events, events[1:] + [None]):
        if event.status == Status.RUNNING:
            spans.append((event.runner_id, event.at, after.at if after else None))
    return spans


def assert_never_running_twice(store, job_id: int) -> list:
    """From the job's timeline: each RUNNING came from QUEUED, and no two
    RUNNING stretches overlap."""
    events = store.job_events(job_id)
    for before, event in zip(events, events[1:]):
        if event.status == Status.RUNNING:
            assert before.status == Status.QUEUED, events
    spans = running_spans(events)
    for (_, _, end), (_, begin, _) in zip(spans, spans[1:]):
        assert end is not None and end <= begin, spans
    return spans


@pytest.fixture
def store(environ):
    store = open_store(load_settings(environ))
    yield store
    store.dispose()


# -- a. retries ------------------------------------------------------------------------


RETRY_CONFIG = """
[actions.refuse]
callable = "tests.sample_actions:refuse_retry"
[actions.exit3]
command = ["sh", "-c", "exit 3"]
final_exit_codes = [3]
"""


def test_retries_back_off_and_final_failures_end_at_once(environ):
    env = configure(environ, RETRY_CONFIG)
    failing = submit(env, "fail", "--retries", "2")
    refusing = submit(env, "refuse", "--retries", "5")
    final_code = submit(env, "exit3", "--retries", "3")
    with Cycles(env):
        wait_for(lambda: all(show(env, i)["status"] in ("FAILURE", "SUCCESS")
                             for i in (failing, refusing, final_code)),
                 timeout=40, interval=0.2, message="the three jobs to end")

    job = show(env, failing)
    assert (job["status"], job["attempt"], job["retries"]) == ("FAILURE", 3, 2)
    assert job["error"]
    events = job["events"]
    assert [e["attempt"] for e in events if e["status"] == "RUNNING"] == [1, 2, 3]
    retried = [e for e in events if e["status"] == "PENDING" and e["previous"] == "RUNNING"]
    assert len(retried) == 2 and all(e["note"] for e in retried)  # the error is kept
    starts = [e for e in events if e["status"] == "RUNNING"]
    # retry_backoff 0.5s doubled per attempt, +-25 %: 0.375-0.625s, then 0.75-1.25s.
    gaps = [(at(s["at"]) - at(r["at"])).total_seconds() for r, s in zip(retried, starts[1:])]
    # Latency only adds: the second wait's floor is above the first's ceiling.
    assert gaps[0] >= 0.35 and gaps[1] >= 0.7, gaps

    for job_id in (refusing, final_code):
        job = show(env, job_id)
        assert (job["status"], job["attempt"]) == ("FAILURE", 1), job
        assert [e["status"] for e in job["events"]].count("RUNNING") == 1
    assert "refuses" in show(env, refusing)["error"]


# -- b. a runner killed with SIGKILL ------------------------------------------------------


def test_killed_runners_jobs_are_retried_or_abandoned_by_another_node(environ, tmp_path, store):
    env_a = configure(environ, "")
    env_b = node_env(environ, tmp_path, "node-b")
    env_a["RUNJOBS_NODE"] = "node-a"
    retried = submit(env_a, "sleep", "seconds=3", "--retries", "1")
    abandoned = submit(env_a, "sleep", "seconds=3")

    runner_a = subprocess.Popen(runjobs_cmd("run", "--period", "60", "--margin", "2"),
                                env=env_a, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: all(store.job_get(i).status == Status.RUNNING
                             for i in (retried, abandoned)),
                 timeout=15, message="both jobs to run on node-a")
        runner_id = store.job_get(retried).runner_id
        os.killpg(runner_a.pid, signal.SIGKILL)
        runner_a.wait(timeout=10)
        killed_at = time.monotonic()
    finally:
        if runner_a.poll() is None:
            os.killpg(runner_a.pid, signal.SIGKILL)
            runner_a.wait(timeout=10)
    assert store.job_get(retried).status == Status.RUNNING  # nobody noticed yet

    with Cycles(env_b, min_left=4):
        wait_for(lambda: store.job_get(abandoned).status == Status.ABANDONED,
                 timeout=12, message="the job without retries to be abandoned")
        rescued_after = time.monotonic() - killed_at
        wait_for(lambda: store.job_get(retried).status in FINAL, timeout=15,
                 message="the retried job to end")

    # heartbeat_timeout (2s) + one rescue round and a cycle's start-up.
    assert rescued_after < 2 + 4, rescued_after
    gone = store.job_get(abandoned)
    assert f"runner {runner_id}" in gone.error and "node-a" in gone.error
    again = store.job_get(retried)
    assert (again.status, again.attempt, again.node) == (Status.SUCCESS, 2, "node-b")
    for job_id in (retried, abandoned):
        assert_never_running_twice(store, job_id)
    runners = [r for r in store.runners_list() if r.id == runner_id]
    assert runners[0].state == "dead"
    spans = running_spans(store.job_events(retried))
    assert [s[0] for s in spans][0] == runner_id and spans[1][0] != runner_id


# -- c. three nodes, one queue (PostgreSQL) -------------------------------------------


# PostgreSQL-only tests take the `db_url` fixture's PostgreSQL half alone:
# no SQLite variant is collected, so none is skipped.
pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pg_only
def test_three_nodes_run_every_job_exactly_once(environ, tmp_path, store):
    env = configure(environ, '[actions.append]\ncallable = "tests.sample_actions:append_id"\n'
                             'capacity = {default = 8}\n')
    out = tmp_path / "ids.txt"
    client = Client(load_settings(env), store)
    ids = client.submit_many([{"action": "append", "params": {"path": str(out)}}] * 3000)
    envs = [node_env(env, tmp_path, f"node-{n}") for n in "xyz"]
    processes = [subprocess.Popen(runjobs_cmd("run", "--once"), env=e,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for e in envs]
    try:
        for process in processes:
            assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            process.stderr.close()

    written = [int(line) for line in out.read_text().split()]
    assert sorted(written) == sorted(ids)  # every id, none twice
    with store.engine.begin() as conn:
        counts = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM jobs GROUP BY status")).all())
        nodes = dict(conn.execute(sa.text("SELECT node, count(*) FROM jobs GROUP BY node")).all())
    assert counts == {"SUCCESS": 3000}
    assert sum(nodes.values()) == 3000 and len(nodes) >= 2, nodes


# -- d. the database drops every connection (PostgreSQL) --------------------------------


def terminate_all_backends(url: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            return len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).all())
    finally:
        engine.dispose()


def allow_connections(url: str, allow: bool) -> None:
    """Open or close the test database to new connections, and when closing
    cut the ones it has (from the postgres database: it cannot be entered)."""
    target = sa.make_url(url)
    engine = sa.create_engine(target.set(database="postgres"), poolclass=sa.pool.NullPool,
                              isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{target.database}" '
                                 f"WITH ALLOW_CONNECTIONS {'true' if allow else 'false'}"))
            if not allow:
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :name"), {"name": target.database})
    finally:
        engine.dispose()


@pg_only
def test_lost_database_leaves_no_job_stuck_and_logs_once(environ, store):
    env = configure(environ, "capacity = {default = 3}\n")
    url = env["RUNJOBS_DATABASE_URL"]
    running = [submit(env, "sleep", "seconds=2", "--retries", "1") for _ in range(3)]
    waiting = [submit(env, "sleep", "seconds=1") for _ in range(3)]
    log_file = Path(env["RUNJOBS_HOME"]) / "logs" / "runjobs.log"

    with Cycles(env, min_left=12):
        wait_for(lambda: all(store.job_get(i).status == Status.RUNNING for i in running),
                 timeout=15, message="three jobs running")
        # First every connection is cut once; then the database stays away
        # for a few seconds (tens of ticks, heartbeats and the jobs' ends).
        assert terminate_all_backends(url) >= 1
        allow_connections(url, False)
        try:
            time.sleep(3)
        finally:
            allow_connections(url, True)
        store.dispose()  # the test's own connections were cut too

        def settled():
            statuses = [store.job_get(i).status for i in running + waiting]
            return all(s in FINAL or s == Status.PENDING for s in statuses) and statuses
        wait_for(settled, timeout=25, interval=0.2, message="every job final or pending")
        # Another cycle: nothing is left QUEUED or RUNNING behind anyone's back.
        wait_for(lambda: all(store.job_get(i).status in FINAL for i in running + waiting),
                 timeout=25, interval=0.2, message="every job final")

    for job_id in running + waiting:
        assert store.job_get(job_id).status in (Status.SUCCESS, Status.ABANDONED)
    text = log_file.read_text()
    assert "database unavailable" in text and "database available again" in text, text
    per_runner: dict[str, list[str]] = {}
    for line in text.splitlines():
        if " ERROR " in line:
            per_runner.setdefault(line.split("[")[1].split("]")[0], []).append(line)
    # One line per thing that failed (the loop, the heartbeat, unrecorded
    # outcomes), not one per query, tick or retry.
    for lines in per_runner.values():
        assert len(lines) <= 3, "\n".join(lines)
        assert sum("database unavailable" in line for line in lines) <= 1, "\n".join(lines)


# -- e. LISTEN/NOTIFY wakes an idle runner (PostgreSQL) ------------------------------------


@pg_only
def test_submit_wakes_an_idle_runner_within_a_second(environ, store):
    env = environ
    write_config(Path(env["RUNJOBS_HOME"]), 'poll_interval = "5s"\n')
    client = Client(load_settings(env), store)
    runner = subprocess.Popen(runjobs_cmd("run", *cycle_args(20)), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: store.runners_list(), timeout=10, message="the runner to register")
        for _ in range(2):
            time.sleep(1.5)  # idle: its next poll is seconds away
            job_id = client.submit("noop")
            job = client.wait(job_id, timeout=10, interval=0.05)
            assert job.status == Status.SUCCESS
            latency = (job.started_at - job.created_at).total_seconds()
            assert latency < 1.0, latency
    finally:
        runner.kill()
        runner.wait(timeout=10)


@pg_only
def test_a_round_that_asks_nothing_does_not_declare_the_database_back(environ, store, caplog):
    """While the database is away, a round that sends no query (every slot
    busy, no job ended, no check due) knows nothing new: it must not log
    'database available again' and then, failing at once, 'unavailable'
    anew. The runner says each once per outage."""
    from runjobs.actions import Registry
    from runjobs.runner import Runner

    configure(environ, "capacity = {default = 1}\n")
    settings = load_settings(environ)
    runner = Runner(settings, store, Registry(settings))
    runner.register(None)
    Client(settings).submit("sleep", {"seconds": 2})
    # Rounds at chosen monotonic times: the cancel check is due every 0.5 s
    # while a job runs, expiry and rescue every 5 s (the defaults).
    t = time.monotonic()
    assert runner.tick(t).started == 1
    url = environ["RUNJOBS_DATABASE_URL"]
    caplog.set_level("INFO", logger="runjobs.runner")
    allow_connections(url, False)
    try:
        runner.tick(t + 1.0)  # the cancel check is due: it fails
        runner.tick(t + 1.1)  # nothing is due, no job ended, no slot free: no query
    finally:
        allow_connections(url, True)
    runner.tick(t + 2.0)  # the cancel check is due again, and answered
    said = [r.getMessage() for r in caplog.records if "database" in r.getMessage()]
    assert [("unavailable" in m, "available again" in m) for m in said] == [
        (True, False), (False, True)], said
    # Let the job end and be reaped here: its log file is closed then.
    wait_for(lambda: runner.tick() and not runner.running, timeout=15,
             message="the job ended and was recorded")
