"""Migrations match the model, go down and up again, and the store's schema
policy: PostgreSQL never changes schema unasked, SQLite upgrades itself.

Each test gets an EMPTY database of its own: a new SQLite file, or a
throwaway PostgreSQL database created (and dropped) through the `postgres`
maintenance database of RUNJOBS_TEST_PG_URL.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from typing import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from runjobs import migrate
from runjobs.config import load_settings, pg_url
from runjobs.errors import SchemaError
from runjobs.models import JobSpec, Status
from runjobs.schema import HEAD_REVISION, metadata, use_dialect
from runjobs.store import Store, make_engine, open_store

PG_URL = os.environ.get("RUNJOBS_TEST_PG_URL")
TABLES = {"runners", "crons", "jobs", "job_events"}


@contextlib.contextmanager
def scratch_pg_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    url = sa.make_url(pg_url(PG_URL))
    name = f"runjobs_mig_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    """The URL of an empty database that only this test uses."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'runjobs.db'}"
        return
    if not PG_URL:
        pytest.skip("RUNJOBS_TEST_PG_URL is not set")
    with scratch_pg_database() as url:
        yield url


@pytest.fixture
def mig_settings(empty_url, tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    config = home / "runjobs.toml"
    config.write_text("")
    return load_settings({"RUNJOBS_HOME": str(home), "RUNJOBS_CONFIG": str(config)},
                         database_url=empty_url)


@pytest.fixture
def bare_store(mig_settings):
    """A store on the empty database, built without open_store's schema check."""
    store = Store(make_engine(mig_settings), mig_settings)
    yield store
    store.dispose()


def table_names(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def schema_diff(store: Store) -> list:
    """Alembic's autogenerate comparison of the database with schema.metadata."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
        if conn.dialect.name == "sqlite":
            diff = _without_sqlite_sort_order(conn, diff)
    return diff


def _without_sqlite_sort_order(conn: sa.Connection, diff: list) -> list:
    """SQLite's reflection does not report an index column's DESC, so Alembic
    sees ix_jobs_pending's `priority DESC` as a different index. Indexes are
    checked here against the DDL SQLite stored instead (which also covers the
    partial indexes' WHERE, that Alembic does not compare), and that one
    false difference is dropped."""
    stored = dict(conn.execute(sa.text(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")).all())
    expected = {index.name: str(sa.schema.CreateIndex(index).compile(dialect=conn.dialect))
                for table in metadata.sorted_tables for index in table.indexes}
    normal = lambda sql: re.sub(r"\s+", " ", sql).strip()  # noqa: E731
    assert {k: normal(v) for k, v in stored.items()} == {k: normal(v) for k, v in expected.items()}
    sorted_names = {index.name for table in metadata.sorted_tables for index in table.indexes
                    if any(isinstance(e, sa.sql.elements.UnaryExpression) for e in index.expressions)}
    return [d for d in diff if not (
        isinstance(d, tuple) and d[0] in ("add_index", "remove_index") and d[1].name in sorted_names)]


def test_schema_head_revision_is_the_migrations_head():
    assert HEAD_REVISION == migrate.head()


def test_upgraded_empty_database_matches_the_model(bare_store):
    assert bare_store.schema_revision() is None
    assert not table_names(bare_store) & TABLES
    migrate.upgrade(bare_store)
    assert bare_store.schema_revision() == HEAD_REVISION
    assert TABLES <= table_names(bare_store)
    assert schema_diff(bare_store) == []


# What Alembic's comparison cannot see on PostgreSQL: the partial indexes'
# WHERE and the triggers. The migrated database's indexes are held to those
# the model itself creates (create_all on another empty database, so both
# come out in PostgreSQL's own spelling); the triggers, which the model does
# not hold, to this list.
PG_TRIGGERS = {
    ("jobs_inserted", "AFTER INSERT ON public.jobs FOR EACH STATEMENT "
                      "EXECUTE FUNCTION runjobs_jobs_inserted()"),
    ("jobs_updated", "AFTER UPDATE ON public.jobs REFERENCING OLD TABLE AS old_rows NEW TABLE "
                     "AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION runjobs_jobs_updated()"),
    ("jobs_deleted", "AFTER DELETE ON public.jobs REFERENCING OLD TABLE AS gone FOR EACH "
                     "STATEMENT EXECUTE FUNCTION runjobs_jobs_deleted()"),
}


def pg_index_definitions(url: str) -> dict[str, str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
            "AND tablename <> 'alembic_version'")).all()
    engine.dispose()
    return dict(rows)


def pg_triggers(url: str) -> set[tuple[str, str]]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")).all()
    engine.dispose()
    return {(name, definition.split(f"TRIGGER {name} ", 1)[1]) for name, definition in rows}


@pytest.mark.parametrize("empty_url", ["postgresql"], indirect=True)
def test_postgresql_partial_indexes_and_triggers_match_the_model(bare_store, empty_url):
    migrate.upgrade(bare_store)
    with scratch_pg_database() as model_url:
        engine = sa.create_engine(model_url, poolclass=sa.pool.NullPool)
        use_dialect("postgresql")
        metadata.create_all(engine)
        engine.dispose()
        expected = pg_index_definitions(model_url)
    migrated = pg_index_definitions(empty_url)
    assert any(" WHERE " in definition for definition in expected.values())
    assert migrated == expected
    assert pg_triggers(empty_url) == PG_TRIGGERS


def test_downgrade_to_base_and_upgrade_again(bare_store):
    migrate.upgrade(bare_store)
    migrate.downgrade(bare_store, "base")
    assert not table_names(bare_store) & TABLES
    assert bare_store.schema_revision() is None

    migrate.upgrade(bare_store)
    assert bare_store.schema_revision() == HEAD_REVISION
    assert schema_diff(bare_store) == []
    # The event triggers came back with the tables.
    (job,) = bare_store.jobs_submit([JobSpec("noop")])
    assert [e.status for e in bare_store.job_events(job.id)] == [Status.PENDING]


def test_store_on_a_database_not_at_head(mig_settings, bare_store):
    if mig_settings.database_url.startswith("sqlite"):
        # The embedded default creates and upgrades its own schema.
        store = open_store(mig_settings)
        try:
            assert store.schema_revision() == HEAD_REVISION
            assert TABLES <= table_names(store)
            (job,) = store.jobs_submit([JobSpec("noop")])
            assert store.job_get(job.id).status == Status.PENDING
        finally:
            store.dispose()
        # An older SQLite file is brought to head the same way.
        migrate.downgrade(bare_store, "base")
        open_store(mig_settings).dispose()
        assert bare_store.schema_revision() == HEAD_REVISION
        return

    # PostgreSQL: refuses an empty database, and changes nothing.
    with pytest.raises(SchemaError, match=r"no runjobs schema.*`runjobs db upgrade`"):
        open_store(mig_settings)
    assert not table_names(bare_store) & TABLES

    # Refuses a database at another revision, naming both and the command.
    migrate.upgrade(bare_store)
    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000'"))
    with pytest.raises(SchemaError, match=rf"0000.*{HEAD_REVISION}.*`runjobs db upgrade`"):
        open_store(mig_settings)
    assert bare_store.schema_revision() == "0000"

    # At head it opens.
    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"),
                     {"head": HEAD_REVISION})
    open_store(mig_settings).dispose()


def test_0002_keeps_jobs_and_its_trigger_records_a_claim_that_starts(bare_store):
    """0002 swaps indexes and the event trigger under existing jobs; down
    again, a claim that starts at once is recorded as one event."""
    migrate.upgrade(bare_store, "0001")
    (old,) = bare_store.jobs_submit([JobSpec("noop")])
    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []
    assert bare_store.job_get(old.id).status == Status.PENDING

    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    (job,) = bare_store.runner_round(runner, "node-a", {"default": 1}, [], claim=True)
    assert job.id == old.id and job.status == Status.RUNNING and job.attempt == 1
    timeline = [(e.previous, e.status) for e in bare_store.job_events(job.id)]
    assert timeline == [(None, Status.PENDING), (Status.PENDING, Status.QUEUED),
                        (Status.QUEUED, Status.RUNNING)]

    migrate.downgrade(bare_store, "0001")
    (other,) = bare_store.jobs_submit([JobSpec("noop")])
    bare_store.runner_round(runner, "node-a", {"default": 2}, [], claim=True)
    timeline = [(e.previous, e.status) for e in bare_store.job_events(other.id)]
    assert timeline == [(None, Status.PENDING), (Status.PENDING, Status.RUNNING)]


def finish_by_hand(store: Store, ids: list[int]) -> None:
    """RUNNING -> SUCCESS in one statement, as the store's finish does; by
    hand, because the store's own writes columns of later migrations (0007)."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET status = 'SUCCESS', finished_at = updated_at "
                             "WHERE id IN :ids").bindparams(sa.bindparam("ids", expanding=True)),
                     {"ids": ids})


def _event_fks(store: Store) -> list:
    with store.engine.connect() as conn:
        return sa.inspect(conn).get_foreign_keys("job_events")


def test_0003_drops_the_events_key_and_a_deleted_job_still_takes_its_events(bare_store):
    """0003 drops job_events' foreign key under existing events; a trigger
    does its ON DELETE CASCADE. Down again, the key is back."""
    migrate.upgrade(bare_store, "0002")
    (old,) = bare_store.jobs_submit([JobSpec("noop")])
    assert [fk["referred_table"] for fk in _event_fks(bare_store)] == ["jobs"]
    migrate.upgrade(bare_store, "0003")
    assert _event_fks(bare_store) == []
    (kept,) = bare_store.jobs_submit([JobSpec("noop")])
    assert [e.status for e in bare_store.job_events(old.id)] == [Status.PENDING]

    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": old.id})
    with bare_store.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT job_id FROM job_events")).scalars().all()
    assert left == [kept.id]

    migrate.downgrade(bare_store, "0002")
    assert [fk["referred_table"] for fk in _event_fks(bare_store)] == ["jobs"]
    assert [e.status for e in bare_store.job_events(kept.id)] == [Status.PENDING]
    # 0002's triggers are back and record as before.
    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    (job,) = bare_store.runner_round(runner, "node-a", {"default": 1}, [], claim=True)
    assert [e.status for e in bare_store.job_events(job.id)] == [
        Status.PENDING, Status.QUEUED, Status.RUNNING]


def test_0003_events_of_many_jobs_in_one_statement_keep_each_timeline(bare_store):
    """On PostgreSQL, 0003 writes a statement's events at once from its
    transition tables: each job's timeline must still read in order, and a
    hand-written UPDATE is recorded like the store's."""
    migrate.upgrade(bare_store, "0003")
    submitted = bare_store.jobs_submit([JobSpec("noop") for _ in range(5)])
    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    started = bare_store.runner_round(runner, "node-a", {"default": 5}, [], claim=True)
    assert sorted(job.id for job in started) == [s.id for s in submitted]
    finish_by_hand(bare_store, [job.id for job in started])
    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET status = 'PENDING', error = 'by hand' WHERE id = :id"),
                     {"id": submitted[0].id})
    for job in submitted:
        timeline = [(e.previous, e.status, e.attempt) for e in bare_store.job_events(job.id)]
        assert timeline[:4] == [(None, Status.PENDING, 0), (Status.PENDING, Status.QUEUED, 0),
                                (Status.QUEUED, Status.RUNNING, 1),
                                (Status.RUNNING, Status.SUCCESS, 1)]
    by_hand = bare_store.job_events(submitted[0].id)[-1]
    assert (by_hand.previous, by_hand.status, by_hand.note) == (
        Status.SUCCESS, Status.PENDING, "by hand")
    assert len(bare_store.job_events(submitted[1].id)) == 4


def _stored_events(store: Store, job_id: int) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT previous, status FROM job_events WHERE job_id = :id ORDER BY id"),
            {"id": job_id}).all()


def test_0004_a_submit_stores_no_event_and_its_timeline_still_starts_with_it(bare_store):
    """At 0004 the submit's event is read from the job's row: its first
    status is where its first change started. A job submitted before keeps
    its stored event, shown once. Down again, submits store theirs."""
    migrate.upgrade(bare_store, "0003")
    (old,) = bare_store.jobs_submit([JobSpec("noop")])
    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []
    new, held = bare_store.jobs_submit([JobSpec("noop"), JobSpec("noop", hold=True)])
    (single,) = bare_store.jobs_submit([JobSpec("noop")])  # the one-INSERT path
    for job in (new, held, single):
        assert _stored_events(bare_store, job.id) == []

    def timeline(job_id):
        return [(e.previous, e.status, e.runner_id, e.attempt, e.note)
                for e in bare_store.job_events(job_id)]

    pending = (None, Status.PENDING, None, 0, None)
    assert timeline(old.id) == timeline(new.id) == timeline(single.id) == [pending]
    assert timeline(held.id) == [(None, Status.HELD, None, 0, None)]
    first = bare_store.job_events(new.id)[0]
    assert first.at == bare_store.job_get(new.id).created_at

    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    started = bare_store.runner_round(runner, "node-a", {"default": 3}, [], claim=True)
    assert sorted(job.id for job in started) == [old.id, new.id, single.id]
    for job_id in (old.id, new.id):
        assert [(p, s) for p, s, *_ in timeline(job_id)] == [
            (None, Status.PENDING), (Status.PENDING, Status.QUEUED),
            (Status.QUEUED, Status.RUNNING)]
    bare_store.job_cancel(held.id)
    assert [(p, s) for p, s, *_ in timeline(held.id)] == [
        (None, Status.HELD), (Status.HELD, Status.CANCELED)]
    assert bare_store.job_events(10**9) == []

    migrate.downgrade(bare_store, "0003")
    (after,) = bare_store.jobs_submit([JobSpec("noop")])
    assert _stored_events(bare_store, after.id) == [(None, "PENDING")]


def _rows(store: Store, table: str, width: int | None = None) -> list[tuple]:
    """The table's rows; with `width`, only their first `width` columns (a
    later migration appends columns)."""
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id")).all()
    return [tuple(row)[:width] for row in rows]


def _cron_fire_index(store: Store) -> tuple[bool, str | None]:
    """(is a unique constraint, the unique index's WHERE) of ux_jobs_cron_fire."""
    with store.engine.connect() as conn:
        inspector = sa.inspect(conn)
        constraint = any(u["name"] == "ux_jobs_cron_fire"
                         for u in inspector.get_unique_constraints("jobs"))
        where = [i["dialect_options"].get(f"{conn.dialect.name}_where")
                 for i in inspector.get_indexes("jobs") if i["name"] == "ux_jobs_cron_fire"]
    return constraint, (str(where[0]) if where and where[0] is not None else None)


def test_0005_indexes_cron_jobs_only_and_keeps_every_row_link_and_trigger(bare_store):
    """0005 makes ux_jobs_cron_fire a unique index over cron jobs; SQLite
    rebuilds jobs for it. Rows, rerun links and events survive both ways,
    the triggers still record and delete events, and a cron still fires
    once per time."""
    migrate.upgrade(bare_store, "0004")
    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    (first,) = bare_store.jobs_submit([JobSpec("noop", {"n": 1})])
    (started,) = bare_store.runner_round(runner, "node-a", {"default": 1}, [], claim=True)
    finish_by_hand(bare_store, [started.id])
    rerun, cron_job = bare_store.jobs_submit([JobSpec("noop", rerun_of=first.id), JobSpec("noop")])
    fire = {"id": cron_job.id, "at": "2026-11-22 10:00:00"}
    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO crons (id, name, schedule, action, params, created_at) "
                             "VALUES (7, 'nightly', '0 3 * * *', 'noop', '{}', :at)"), fire)
        conn.execute(sa.text("UPDATE jobs SET cron_id = 7, cron_fire_at = :at WHERE id = :id"), fire)
    jobs_before, events_before = _rows(bare_store, "jobs"), _rows(bare_store, "job_events")
    assert _cron_fire_index(bare_store) == (True, None)

    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []
    constraint, where = _cron_fire_index(bare_store)
    assert not constraint and "cron_id IS NOT NULL" in where
    assert _rows(bare_store, "jobs", len(jobs_before[0])) == jobs_before
    assert _rows(bare_store, "job_events") == events_before
    assert bare_store.job_get(rerun.id).rerun_of == first.id
    with pytest.raises(sa.exc.IntegrityError), bare_store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE jobs SET cron_id = 7, cron_fire_at = :at WHERE id = :id"),
                     {**fire, "id": rerun.id})
    # The triggers came back: a claim is recorded, a deleted job takes its events.
    bare_store.runner_round(runner, "node-a", {"default": 2}, [], claim=True)
    assert [e.status for e in bare_store.job_events(rerun.id)] == [
        Status.PENDING, Status.QUEUED, Status.RUNNING]
    with bare_store.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": first.id})
    assert bare_store.job_events(first.id) == []
    assert bare_store.job_get(rerun.id).rerun_of is None  # ON DELETE SET NULL still holds

    migrate.downgrade(bare_store, "0005")
    jobs_before = _rows(bare_store, "jobs")
    migrate.downgrade(bare_store, "0004")
    assert _cron_fire_index(bare_store) == (True, None)
    assert _rows(bare_store, "jobs") == jobs_before
    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []


def test_0007_adds_the_process_group_columns_under_existing_jobs_and_back(bare_store):
    """0007 adds jobs.pgid and pgid_runner (NULL for the jobs already there)
    and their partial index; down again, the rows are as they were and the
    queue still works."""
    migrate.upgrade(bare_store, "0006")
    (old,) = bare_store.jobs_submit([JobSpec("noop")])
    before = _rows(bare_store, "jobs")
    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []
    after = _rows(bare_store, "jobs")
    assert [row[:len(before[0])] for row in after] == before
    assert [row[len(before[0]):] for row in after] == [(None, None)]

    runner = bare_store.runner_register("node-a", 1, None, None, "test")
    (job,) = bare_store.runner_round(runner, "node-a", {"default": 1}, [], claim=True)
    assert job.id == old.id
    assert bare_store.job_process_group(job.id, runner, 4242)
    with bare_store.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT pgid, pgid_runner FROM jobs WHERE id = :id"),
                              {"id": job.id}).one()
    assert tuple(stored) == (4242, runner)

    migrate.downgrade(bare_store, "0006")
    assert len(_rows(bare_store, "jobs")[0]) == len(before[0])
    with bare_store.engine.connect() as conn:
        indexes = {i["name"] for i in sa.inspect(conn).get_indexes("jobs")}
    assert "ix_jobs_process_group" not in indexes
    migrate.upgrade(bare_store)
    assert schema_diff(bare_store) == []
