"""The runner's statements are served by the indexes meant for them.

A claim that scans every PENDING row, or a node's use that scans the whole
table, is correct and passes every other test, yet makes a drain quadratic in
the queue's length. These tests catch the SQL the store really sends during a
runner's rounds and ask the database for its plan: EXPLAIN QUERY PLAN on
SQLite, EXPLAIN on PostgreSQL, each right after a bulk submit, when
PostgreSQL's statistics are stale as they are in a real drain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re

import pytest
import sqlalchemy as sa

from tests.conftest import is_postgres
from runjobs.models import JobSpec, Outcome, Status

NODE = "node-a"
CAPACITY = {"default": 8}


@contextlib.contextmanager
def sent(store):
    """The (statement, parameters) the store sends to the driver meanwhile."""
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)


def plan(store, statement: str, parameters) -> str:
    prefix = "EXPLAIN " if is_postgres(store) else "EXPLAIN QUERY PLAN "
    if statement.startswith("EXECUTE "):
        # A statement the round prepared on its own connection: ask there,
        # for the plan PostgreSQL would now use for it.
        driver = store._round_conn.connection.driver_connection
        with driver.cursor() as cursor:
            cursor.execute(prefix + statement, parameters)
            rows = cursor.fetchall()
        driver.rollback()
        return "\n".join(str(row[0]) for row in rows)
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(prefix + statement, parameters)
        rows = cursor.fetchall()
    finally:
        raw.rollback()
        raw.close()
    return "\n".join(str(row[0] if is_postgres(store) else row[-1]) for row in rows)


def assert_indexed(store, statement: str, parameters) -> str:
    """No full scan of jobs and no sort: each statement reads only the rows
    it is about."""
    text = plan(store, statement, parameters)
    if is_postgres(store):
        assert not re.search(r"Seq Scan on jobs|Sort|Bitmap", _without_candidates_sort(text)), \
            f"{statement}\n{text}"
    else:
        for line in text.splitlines():
            if re.match(r"(SCAN|SEARCH) (jobs|active)\b", line):
                assert "USING" in line, f"{statement}\n{text}"
        assert "TEMP B-TREE" not in text, f"{statement}\n{text}"
    return text


def _without_candidates_sort(text: str) -> str:
    """A PostgreSQL plan less the Sort that ranks the claim's locked
    candidates: a CTE of at most a round's slots of rows."""
    lines = text.splitlines()
    return "\n".join(line for n, line in enumerate(lines)
                     if "Sort" not in line
                     or not any("CTE Scan on candidates" in below for below in lines[n + 1:n + 3]))


@pytest.fixture
def busy_store(store):
    """5,000 jobs just submitted in bulk, one runner registered."""
    store.jobs_submit([JobSpec("noop", priority=n % 3) for n in range(5000)])
    store.jobs_submit([JobSpec("noop", max_start_at=dt.datetime.now(dt.timezone.utc)
                               + dt.timedelta(hours=1))])
    return store


def test_a_runner_round_is_served_by_indexes(busy_store):
    store = busy_store
    runner = store.runner_register(NODE, 1, None, None, "test")
    first = store.runner_round(runner, NODE, CAPACITY, [], claim=True)
    assert len(first) == 8
    with sent(store) as statements:
        done = [(job, Outcome(Status.SUCCESS), None) for job in first]
        assert len(store.runner_round(runner, NODE, CAPACITY, done, claim=True)) == 8
    plans = [assert_indexed(store, s, p) for s, p in statements
             if s.lstrip().upper().startswith(("SELECT", "UPDATE", "WITH", "EXECUTE"))]
    if is_postgres(store):
        # One statement: the outcomes (a CTE), the candidates, the claim.
        assert len(plans) == 1
        candidates = claim = plans[0]
        assert "CTE finished" in candidates
    else:
        assert len(plans) == 3  # finish, candidates with the node's use, claim-and-start
        finish, candidates, claim = plans
    assert "ix_jobs_pending" in candidates and "ix_jobs_active" in candidates
    # The claim finds its 8 rows by id, not by walking the pending index.
    if is_postgres(store):
        assert re.search(r"Index Scan using jobs_pkey on jobs .*\n\s+Index Cond: \(id = ranked\.id\)",
                         claim), claim
        assert claim.count("ix_jobs_pending") == 1, claim  # the candidates' scan only
    else:
        assert "PRIMARY KEY" in claim and "ix_jobs_pending" not in claim


def test_the_runners_other_statements_are_served_by_indexes(busy_store):
    store = busy_store
    runner = store.runner_register(NODE, 1, None, None, "test")
    store.runner_round(runner, NODE, CAPACITY, [], claim=True)
    with sent(store) as statements:
        store.jobs_canceling(runner)
        store.jobs_expire()
        store.jobs_count_active(NODE)
        store.jobs_submit([JobSpec("noop", key="nightly")])
    for statement, parameters in statements:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
            assert_indexed(store, statement, parameters)


def test_deleting_a_job_finds_its_reruns_by_index(busy_store):
    """rerun_of's ON DELETE SET NULL looks up the reruns of every deleted job.
    These are the lookups each database makes for it: a scan of jobs there
    made deleting old jobs by hand quadratic (2,000 of 200,000 took 48 s on
    SQLite and 17 s on PostgreSQL; 0.01 s with ix_jobs_rerun_of)."""
    store = busy_store
    (original,) = store.jobs_submit([JobSpec("noop")])
    (rerun,) = store.jobs_submit([JobSpec("noop", rerun_of=original.id)])
    if is_postgres(store):  # what PostgreSQL's referential-action trigger runs
        lookup = "UPDATE ONLY jobs SET rerun_of = NULL WHERE %s = rerun_of"
    else:  # SQLite's child-key search
        lookup = "SELECT 1 FROM jobs WHERE rerun_of = ?"
    assert "ix_jobs_rerun_of" in assert_indexed(store, lookup, (original.id,))
    with store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": original.id})
    assert store.job_get(rerun.id).rerun_of is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("finish", [False, True], ids=["claim", "finish-and-claim"])
def test_the_round_is_planned_once_on_postgresql(busy_store, finish):
    """The round's one statement is prepared with its LIMIT written in, so
    after PostgreSQL's five custom plans it runs on one generic plan: no
    planning per round, half the round's server time. (SQLite keeps its
    compiled statements in the driver's cache.)"""
    store = busy_store
    runner = store.runner_register(NODE, 1, None, None, "test")
    started = store.runner_round(runner, NODE, CAPACITY, [], claim=True)
    for _ in range(8):
        done = [(job, Outcome(Status.SUCCESS), None) for job in started] if finish else []
        if not finish:
            store.jobs_finish(runner, [(job, Outcome(Status.SUCCESS), None) for job in started])
        started = store.runner_round(runner, NODE, CAPACITY, done, claim=True)
        assert len(started) == 8
    driver = store._round_conn.connection.driver_connection
    with driver.cursor() as cursor:
        cursor.execute("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
        prepared = cursor.fetchall()
    driver.rollback()
    rounds = [row for row in prepared if "FOR UPDATE OF jobs SKIP LOCKED" in row[0]
              and ("finished AS" in row[0]) == finish]  # the outcomes' CTE
    assert len(rounds) == 1, prepared
    statement, generic, custom = rounds[0]
    assert custom <= 5 and generic >= 3, prepared
    # The LIMIT is in the text, not a parameter: with a bound one PostgreSQL
    # guesses a tenth of the table for the generic plan (at this table's
    # size it still picks the generic plan, so the count alone cannot tell).
    assert re.search(r"LIMIT 8\b", statement), statement
