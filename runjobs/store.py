"""Every SQL statement of runjobs, on SQLite and PostgreSQL.

Nothing else imports SQLAlchemy's engine or a driver. The dialect is decided
once, when the store is built: PostgreSQL claims with FOR UPDATE SKIP LOCKED
and uses the database's clock; SQLite serialises writers with BEGIN IMMEDIATE
(one host, so the host's clock is the database's).

Every status change is a compare-and-set on the status it expects, so a cancel
and a finish, or two runners, can never both win. The database records each
change in job_events itself (triggers, see migrations/versions/0002 and
0003), in the same transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
from pathlib import Path
import select
import sqlite3
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .config import Settings, mask_url
from .errors import Conflict, NotFound, SchemaError, StoreError
from .models import Event, Job, JobSpec, Outcome, Status
from .schema import (ACTIVE_STATUSES, HEAD_REVISION, NOT_FINAL_STATUSES, UtcDateTime,
                     job_events, jobs, runners, use_dialect)

log = logging.getLogger("runjobs.store")

DEFAULT_NEEDS = {"default": 1}
NOTIFY_CHANNEL = "runjobs"
_PENDING = (Status.PENDING.value,)
_RUNNING = (Status.RUNNING.value, Status.TO_CANCEL.value)
_TO_CANCEL = (Status.TO_CANCEL.value,)
_ORDER = (jobs.c.priority.desc(), jobs.c.run_at, jobs.c.id)
# The columns a submit's row fills (Store._row_of); created_at, updated_at
# and run_at come from the insert statement itself.
_ROW_COLUMNS = ("action", "params", "status", "priority", "max_start_at", "timeout",
                "retries", "needs", "key", "rerun_of")
_PLAIN_OUTCOMES = {status: Outcome(status) for status in Status}  # only a status
_active = jobs.alias("active")  # the node's QUEUED/RUNNING jobs, beside the candidates
# The columns a runner needs of a job it starts.
_STARTED = (jobs.c.id, jobs.c.action, jobs.c.params, jobs.c.priority, jobs.c.attempt,
            jobs.c.retries, jobs.c.timeout, jobs.c.needs)


def _status_is(column: sa.ColumnElement, statuses: tuple[str, ...]) -> sa.ColumnElement:
    """`status = 'X'` or `status IN (...)` with the values written into the
    SQL, not bound, in the given order: SQLite uses a partial index only for
    a query that names the index's own values (see schema.ACTIVE_STATUSES)."""
    values = [sa.literal_column(f"'{status}'") for status in statuses]
    return column == values[0] if len(values) == 1 else column.in_(values)


def _held_by(runner_id: int) -> sa.ColumnElement:
    """A runner's QUEUED/RUNNING/TO_CANCEL jobs, in a form ix_jobs_active
    serves on SQLite too."""
    return sa.and_(jobs.c.runner_id == runner_id, _status_is(jobs.c.status, ACTIVE_STATUSES))


def _default_needs(needs: sa.ColumnElement) -> sa.ColumnElement:
    """SQL for what `needs_of` reads as the default needs: none stored, a
    JSON null or an empty object. Any other spelling counts as other needs,
    which only sends the claim the longer way."""
    return sa.or_(needs.is_(None), sa.cast(needs, sa.Text).in_(("null", "{}")))


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Claim:
    """What one claim round got: the jobs, best first, and the node's use
    before it (empty when nothing was due)."""

    jobs: list[Job]
    used: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Finish:
    """Jobs with one outcome, left for the claim's statement to write."""

    ids: list[int]
    outcome: Outcome


@dataclasses.dataclass(frozen=True)
class _DriverSql:
    """A hot statement (the runner's round, a single submit) as text for the
    driver's cursor.

    Compiled once, its parameters put in order here: SQLAlchemy's execution
    (parameter and result processing) cost a round of short jobs more than
    the database's own work. On PostgreSQL it is a prepared statement, so
    the round is not planned again each time (half its server time).
    """

    sql: str                         # what the cursor executes
    names: tuple[str, ...]           # its parameters, in order
    fixed: dict[str, Any]            # values of the parameters the statement sets itself
    processors: dict[str, Callable[[Any], Any]]  # e.g. SQLite's times to text
    prepare: str | None = None       # PostgreSQL: the PREPARE to run once per connection
    name: str | None = None          # ... and the name it prepares

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        """The parameters in order: the caller's (each processed once, though
        SQLite's text names 'now' up to three times), else the statement's
        own, else the n-th of `ids` for ids_n."""
        given = {name: process(params[name])
                 for name, process in self.processors.items() if name in params}
        values = []
        for name in self.names:
            if name in given:
                values.append(given[name])
            elif name in params:
                values.append(params[name])
            elif name in self.fixed:
                values.append(self.fixed[name])
            else:  # ids_3: the third of the ids
                values.append(params["ids"][int(name.rpartition("_")[2]) - 1])
        return values


@dataclasses.dataclass(frozen=True)
class Submitted:
    id: int
    created: bool            # False: an open job with the same key was returned
    params_differ: bool = False


@dataclasses.dataclass(frozen=True)
class RunnerRow:
    id: int
    node: str
    pid: int
    boot_id: str | None
    state: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    deadline: dt.datetime | None
    exited_at: dt.datetime | None
    version: str | None
    heartbeat_age: float
    running: tuple[int, ...]


def needs_of(raw: Mapping[str, int] | None) -> dict[str, int]:
    return dict(raw) if raw else dict(DEFAULT_NEEDS)


def fits(needs: Mapping[str, int], free: Mapping[str, int]) -> bool:
    return all(free.get(name, 0) >= count for name, count in needs.items())


def _fitting(candidates: Iterable[tuple[int, Any]], free: dict[str, int], most: int) -> list[int]:
    """Ids of the candidates, in order, that fit `free` (which it consumes)."""
    chosen = []
    for job_id, raw_needs in candidates:
        if len(chosen) >= most:
            break
        needs = needs_of(raw_needs)
        if fits(needs, free):
            chosen.append(job_id)
            for name, count in needs.items():
                free[name] -= count
    return chosen


def usage(needs_list: Iterable[Mapping[str, int] | None]) -> dict[str, int]:
    used: dict[str, int] = {}
    for raw in needs_list:
        for name, count in needs_of(raw).items():
            used[name] = used.get(name, 0) + count
    return used


class Store:
    """The queue. Build it with `open_store(settings)`."""

    def __init__(self, engine: sa.engine.Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.is_postgres = engine.dialect.name == "postgresql"
        self._round_conn: sa.Connection | None = None
        # The connection kept for single submits (`_submit_one`).
        self._autocommit_conn: sa.Connection | None = None
        self._autocommit_lock = threading.Lock()
        # Errors of statements run on the driver's cursor (`_driver_run`).
        self._driver_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        self._integrity_errors = (sa_exc.IntegrityError, engine.dialect.loaded_dbapi.IntegrityError)
        # Compiled statements by (id of the statement, ids, columns); each
        # keeps its statement, so that no other one can take over its id.
        self._driver_sqls: dict[tuple[int, int, tuple[str, ...]],
                                tuple[sa.Executable, _DriverSql]] = {}
        self._plain_claims: dict[tuple[bool, int, int], sa.Update] = {}

    @contextlib.contextmanager
    def _round_tx(self) -> Iterator[sa.Connection]:
        """A transaction on the connection kept for the runner loop's rounds:
        taking one from the pool and handing it back each round costs a
        fast drain more than the round's SQL. Only the loop's thread uses it;
        after a driver error it is dropped and a new one made next time."""
        try:
            if self._round_conn is None:
                self._round_conn = self.engine.connect()
            with self._round_conn.begin():
                yield self._round_conn
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            self._drop_round_conn()
            raise StoreError(_describe(exc)) from exc

    def _drop_round_conn(self) -> None:
        conn, self._round_conn = self._round_conn, None
        if conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                conn.invalidate()

    # -- plumbing ---------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One transaction; driver errors leave as StoreError."""
        try:
            with self.engine.begin() as conn, self._dropped_if_lost(conn):
                yield conn
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            raise StoreError(_describe(exc)) from exc

    @contextlib.contextmanager
    def _dropped_if_lost(self, conn: sa.Connection) -> Iterator[None]:
        """A statement on the driver's cursor that finds its connection gone
        (a server restart): invalidate the connection here, as SQLAlchemy
        does for its own statements, so the pool does not try to reset it
        (logging a traceback) or hand it out again."""
        try:
            yield
        except self._driver_error as exc:
            if self.engine.dialect.is_disconnect(exc, conn.connection.driver_connection, None):
                conn.invalidate(exc)
            raise

    @contextlib.contextmanager
    def _pooled_autocommit(self) -> Iterator[sa.Connection]:
        """A connection from the pool whose statements, run on the driver's
        cursor, each commit by themselves; handed back as it came. Set on
        the driver: SQLAlchemy's AUTOCOMMIT option (the isolation level set,
        then reset on return) cost about 60 us a submit."""
        try:
            with self.engine.connect() as conn, self._dropped_if_lost(conn):
                if not self.is_postgres:  # sqlite3 runs in autocommit mode (see _on_connect)
                    yield conn
                    return
                driver = conn.connection.driver_connection
                driver.autocommit = True
                try:
                    yield conn
                finally:
                    if not driver.closed:
                        driver.autocommit = False
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            raise StoreError(_describe(exc)) from exc

    def _kept_autocommit(self) -> sa.Connection:
        """The connection the store keeps for single submits (hold
        `_autocommit_lock`), made on first use."""
        if self._autocommit_conn is None:
            try:
                conn = self.engine.connect()
            except sa_exc.DBAPIError as exc:
                raise StoreError(_describe(exc)) from exc
            if self.is_postgres:
                conn.connection.driver_connection.autocommit = True
            self._autocommit_conn = conn
        return self._autocommit_conn

    def _drop_autocommit_conn(self) -> None:
        """Close the kept connection for good: after an error it may be cut,
        and on PostgreSQL it must not go back to the pool in autocommit."""
        conn, self._autocommit_conn = self._autocommit_conn, None
        if conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError, self._driver_error):
                conn.invalidate()

    def _now(self) -> sa.ColumnElement:
        """'Now' as SQL: the database's clock on PostgreSQL."""
        if self.is_postgres:
            return sa.func.statement_timestamp(type_=UtcDateTime)
        return sa.literal(utcnow(), UtcDateTime)

    def _now_plus(self, seconds: float) -> sa.ColumnElement:
        delta = dt.timedelta(seconds=seconds)
        if self.is_postgres:
            return sa.func.statement_timestamp(type_=UtcDateTime) + sa.literal(delta, sa.Interval)
        return sa.literal(utcnow() + delta, UtcDateTime)

    @functools.cached_property
    def _clock(self) -> sa.ColumnElement:
        """'Now' in a statement built once: the database's clock on
        PostgreSQL, on SQLite the `now` parameter `_run` passes."""
        if self.is_postgres:
            return sa.func.statement_timestamp(type_=UtcDateTime)
        return sa.bindparam("now", type_=UtcDateTime)

    def _run(self, conn: sa.Connection, statement: sa.Executable, **params: Any
             ) -> sa.CursorResult:
        """Execute a statement built once (see `_clock`)."""
        if not self.is_postgres:
            params["now"] = utcnow()
        return conn.execute(statement, params)

    def _driver_run(self, conn: sa.Connection, statement: sa.Executable,
                    columns: tuple[str, ...] = (), row_id: bool = False,
                    **params: Any) -> list[tuple]:
        """Execute a statement built once on the driver's cursor (see
        `_DriverSql`); rows as plain tuples, JSON columns still text on
        SQLite. An INSERT names the `columns` its parameters fill; with
        `row_id`, its one row is the cursor's lastrowid (SQLite).
        Listeners of before_cursor_execute see it as usual."""
        if not self.is_postgres:
            params["now"] = utcnow()
        sql = self._driver_sql(statement, len(params.get("ids", ())), columns)
        cursor = conn.connection.driver_connection.cursor()
        try:
            if sql.prepare is not None:
                prepared = conn.info.setdefault("runjobs_prepared", set())
                if sql.name not in prepared:
                    cursor.execute(sql.prepare)
                    prepared.add(sql.name)
            values = sql.values(params)
            if listeners := conn.dispatch.before_cursor_execute:
                listeners(conn, cursor, sql.sql, values, None, False)
            cursor.execute(sql.sql, values)
            if row_id:
                return [(cursor.lastrowid,)]
            return cursor.fetchall() if cursor.description else []
        finally:
            cursor.close()

    def _driver_sql(self, statement: sa.Executable, ids: int,
                    columns: tuple[str, ...]) -> _DriverSql:
        """`statement` compiled for the driver, with `ids` values for an
        expanding `ids` parameter; kept for the store's life."""
        key = (id(statement), ids, columns)
        if key not in self._driver_sqls:
            self._driver_sqls[key] = (statement, _compile_for_driver(
                statement, self.engine.dialect, ids, columns, prepare=self.is_postgres))
        return self._driver_sqls[key][1]

    def db_now(self, conn: sa.Connection | None = None) -> dt.datetime:
        if not self.is_postgres:
            return utcnow()
        if conn is not None:
            return conn.execute(sa.select(self._now())).scalar_one()
        with self._tx() as own:
            return own.execute(sa.select(self._now())).scalar_one()

    def _notify(self, conn: sa.Connection, what: str) -> None:
        """Wake listening runners at commit (PostgreSQL; SQLite runners poll)."""
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, what)))

    def listen(self, on_notify: Callable[[str], None]) -> "Listener | None":
        """Call `on_notify(payload)` from a thread for each NOTIFY: 'submit'
        or 'cancel'. None on SQLite, where runners poll."""
        if not self.is_postgres:
            return None
        listener = Listener(self.engine, on_notify)
        listener.start()
        return listener

    def dispose(self) -> None:
        with self._autocommit_lock:
            self._drop_autocommit_conn()
        if self._round_conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                self._round_conn.close()
            self._round_conn = None
        self.engine.dispose()

    # -- schema -------------------------------------------------------------

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at; None for an empty one."""
        with self._tx() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    # -- submit ---------------------------------------------------------------

    def jobs_submit(self, specs: Sequence[JobSpec]) -> list[Submitted]:
        """Store new jobs in one transaction, in order.

        A spec whose key names a job that is not final yet returns that job.
        """
        if len(specs) == 1 and not specs[0].key and not specs[0].run_in:
            return [self._submit_one(specs[0])]
        for attempt in range(3):
            try:
                with self._tx() as conn:
                    return self._submit_in(conn, specs)
            except StoreError as exc:
                # Two submits of one new key at once: the loser sees the
                # unique index and, on the next try, finds the winner's job.
                if not isinstance(exc.__cause__, self._integrity_errors) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _submit_one(self, spec: JobSpec) -> Submitted:
        """A single job without a key: one INSERT that commits by itself.
        Nothing is read first, so it needs no transaction around it: on
        PostgreSQL that saves the BEGIN and COMMIT round trips, a third of a
        single submit's time; on SQLite the statement takes the write lock
        itself. It runs on the connection the store keeps for this: taking
        one from the pool and handing it back cost a SQLite submit a sixth
        of its time."""
        row = self._row_of(spec, None)
        if not self._autocommit_lock.acquire(blocking=False):
            # Another thread uses the kept connection: one from the pool.
            with self._pooled_autocommit() as conn:
                return Submitted(self._insert_one(conn, row), True)
        try:
            return Submitted(self._insert_one(self._kept_autocommit(), row), True)
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            # Most likely a cut connection; a new one costs little.
            self._drop_autocommit_conn()
            raise StoreError(_describe(exc)) from exc
        finally:
            self._autocommit_lock.release()

    def _submit_in(self, conn: sa.Connection, specs: Sequence[JobSpec]) -> list[Submitted]:
        now = self.db_now(conn) if any(s.run_in for s in specs) else None
        existing = self._open_keys(conn, {s.key for s in specs if s.key})
        results: list[Submitted | None] = []
        rows = []
        # A new key twice in one batch: the first spec makes the job, the
        # later ones return it (inserting both would break ux_jobs_key_open).
        first_of: dict[str, tuple[int, Any]] = {}
        repeats: list[tuple[int, int, bool]] = []
        for spec in specs:
            if spec.key in existing:
                job_id, params = existing[spec.key]
                results.append(Submitted(job_id, False, params != spec.params))
                continue
            if spec.key in first_of:
                first, params = first_of[spec.key]
                repeats.append((len(results), first, params != spec.params))
                results.append(Submitted(0, False))  # placeholder, set below
                continue
            if spec.key:
                first_of[spec.key] = (len(results), spec.params)
            results.append(None)
            rows.append(self._row_of(spec, now))
        if rows:
            new_ids = iter(self._insert(conn, rows))
            results = [r or Submitted(next(new_ids), True) for r in results]
        for position, first, differ in repeats:
            results[position] = Submitted(results[first].id, False, differ)  # type: ignore[union-attr]
        # On PostgreSQL a trigger on jobs sends the 'submit' NOTIFY (0003).
        return results  # type: ignore[return-value]

    def _open_keys(self, conn: sa.Connection, keys: set[str]) -> dict[str, tuple[int, Any]]:
        if not keys:
            return {}
        query = sa.select(jobs.c.key, jobs.c.id, jobs.c.params).where(
            jobs.c.key.in_(keys), jobs.c.key.is_not(None),
            _status_is(jobs.c.status, NOT_FINAL_STATUSES))
        return {key: (job_id, params) for key, job_id, params in conn.execute(query)}

    @staticmethod
    def _row_of(spec: JobSpec, now: dt.datetime | None) -> dict[str, Any]:
        """The row to insert: the columns of `_ROW_COLUMNS`, and `b_run_at`."""
        run_at = spec.run_at
        if spec.run_in:
            run_at = now + dt.timedelta(seconds=spec.run_in)
        return {
            "action": spec.action, "params": spec.params,
            "status": (Status.HELD if spec.hold else Status.PENDING).value,
            "priority": spec.priority, "b_run_at": run_at,
            "max_start_at": spec.max_start_at, "timeout": spec.timeout,
            "retries": spec.retries or 0, "needs": spec.needs, "key": spec.key,
            "rerun_of": spec.rerun_of,
        }

    @functools.cached_property
    def _insert_rows_sql(self) -> sa.Insert:
        """Built once: a statement made per submit costs a single submit
        more than its SQL (SQLite's 'now' was a new literal each time)."""
        now = self._clock
        return sa.insert(jobs).values(
            created_at=now, updated_at=now,
            run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=UtcDateTime), now))

    @functools.cached_property
    def _insert_sql(self) -> sa.Insert:
        return self._insert_rows_sql.returning(jobs.c.id, sort_by_parameter_order=True)

    def _insert_one(self, conn: sa.Connection, row: dict[str, Any]) -> int:
        """One job inserted on the driver's cursor (SQLAlchemy's execution
        cost more than the insert); its id. SQLite's insert has no
        RETURNING: the cursor's lastrowid is the id, and RETURNING cost the
        insert 1.4 of ~17 us."""
        if self.is_postgres:
            (job_id,), = self._driver_run(conn, self._insert_sql, _ROW_COLUMNS, **row)
        else:
            (job_id,), = self._driver_run(conn, self._insert_rows_sql, _ROW_COLUMNS,
                                          row_id=True, **row)
        return job_id

    def _insert(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[int]:
        if len(rows) == 1:
            return [self._insert_one(conn, rows[0])]
        if not self.is_postgres:
            now = utcnow()
            rows = [dict(row, now=now) for row in rows]
        return list(conn.execute(self._insert_sql, rows).scalars())

    # -- claim, start, finish ---------------------------------------------------

    def jobs_claim(self, runner_id: int, node: str, capacity: Mapping[str, int],
                   limit: int | None = None) -> Claim:
        """PENDING -> QUEUED for due jobs that fit the node's free capacity.

        The node's use is counted from its QUEUED/RUNNING/TO_CANCEL rows in
        the same transaction, so a draining runner's jobs count too. `limit`
        caps the number of jobs (None: as many as fit).
        """
        with self._tx() as conn:
            ids, used = self._claim_in(conn, runner_id, node, capacity, limit)
            rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids))).all() if ids else []
        by_id = {row.id: _job(row) for row in rows}
        return Claim([by_id[job_id] for job_id in ids], used)

    def _claim_in(self, conn: sa.Connection, runner_id: int, node: str,
                  capacity: Mapping[str, int], limit: int | None
                  ) -> tuple[list[int], dict[str, int]]:
        """Claim in `conn`: the ids claimed, best first, and the node's use."""
        chosen, used = self._choose(conn, node, capacity, limit)
        if not chosen:
            return [], used
        claimed = set(self._run(conn, self._claim_sql, ids=chosen, runner=runner_id,
                                node_name=node).scalars())
        return [job_id for job_id in chosen if job_id in claimed], used

    def _choose(self, conn: sa.Connection, node: str, capacity: Mapping[str, int],
                limit: int | None) -> tuple[list[int], dict[str, int]]:
        """The ids of due jobs that fit the node's free capacity, best first
        (locked on PostgreSQL), and the node's use."""
        most = sum(max(0, n) for n in capacity.values())
        if limit is not None:
            most = min(most, limit)
        if most <= 0:
            return [], {}
        # Look past a few jobs that need more than is free, so one big job
        # at the head of the queue does not stop small ones from starting.
        rows = self._driver_run(conn, self._candidates_sql, node_name=node, count=most + 16)
        used = usage(self._json(rows[0][2]) or ()) if rows else {}
        free = {name: count - used.get(name, 0) for name, count in capacity.items()}
        return _fitting(((job_id, self._json(needs)) for job_id, needs, _ in rows),
                        free, most), used

    def _json(self, value: Any) -> Any:
        """A JSON column read on the driver's cursor: psycopg2 decodes JSON
        itself (with `_json_loads`), sqlite3 gives the text."""
        return value if value is None or self.is_postgres else _json_loads(value)

    def _started(self, row: tuple, runner_id: int, node: str) -> Job:
        """A job the runner just started, from its `_STARTED` columns read
        on the driver's cursor."""
        job_id, action, params, priority, attempt, retries, timeout, needs = row[:8]
        return Job(id=job_id, action=action, params=self._json(params) or {},
                   status=Status.RUNNING, priority=priority, attempt=attempt, retries=retries,
                   timeout=timeout, needs=needs_of(self._json(needs)), runner_id=runner_id,
                   node=node)

    def _due(self) -> tuple[sa.ColumnElement, ...]:
        """Conditions of a job a runner may claim now."""
        now = self._clock
        return (_status_is(jobs.c.status, _PENDING), jobs.c.run_at <= now,
                sa.or_(jobs.c.max_start_at.is_(None), jobs.c.max_start_at > now))

    @staticmethod
    def _node_jobs(finished_ids: sa.Select | None = None) -> list[sa.ColumnElement]:
        """Conditions of the jobs holding the node's capacity (`_active`):
        its QUEUED/RUNNING/TO_CANCEL jobs, a draining runner's included,
        less those the same statement finishes (`finished_ids`): it reads
        the snapshot from before its own writes."""
        where = [_active.c.node == sa.bindparam("node_name"),
                 _status_is(_active.c.status, ACTIVE_STATUSES)]
        if finished_ids is not None:
            where.append(_active.c.id.not_in(finished_ids))
        return where

    @functools.cached_property
    def _candidates_sql(self) -> sa.Select:
        """Due jobs, best first, locked on PostgreSQL (others skip them), and
        the needs of the node's jobs, in one round trip; the needs are empty
        when nothing is due."""
        node_needs = (sa.select(self._json_array(_active.c.needs))
                      .where(*self._node_jobs()).scalar_subquery())
        query = (
            sa.select(jobs.c.id, jobs.c.needs, node_needs)
            .where(*self._due())
            .order_by(*_ORDER)
            .limit(sa.bindparam("count"))
        )
        if self.is_postgres:
            query = query.with_for_update(skip_locked=True, of=jobs)
        return query

    def _claim_update(self, chosen: sa.ColumnElement | None = None, **values: Any) -> sa.Update:
        """PENDING -> `values` for the chosen jobs: the `ids` parameter, or
        the rows `chosen` names. A runner declared dead (its jobs rescued)
        that comes back takes nothing new: no one would ever rescue jobs of
        a 'dead' runner."""
        alive = sa.exists().where(runners.c.id == sa.bindparam("runner"),
                                  runners.c.state != "dead")
        now = self._clock
        # The rows are found by id. The compare-and-set on PENDING is wrapped
        # so that no planner takes it as a reason to walk ix_jobs_pending:
        # PostgreSQL, its statistics stale after a bulk submit, scanned the
        # whole pending index to find 8 ids.
        still_pending = sa.func.coalesce(jobs.c.status, "") == Status.PENDING.value
        if chosen is None:
            chosen = jobs.c.id.in_(sa.bindparam("ids", expanding=True))
        return (
            sa.update(jobs)
            .where(chosen, still_pending, alive)
            .values(runner_id=sa.bindparam("runner"), node=sa.bindparam("node_name"),
                    queued_at=now, updated_at=now, **values))

    def _start_values(self) -> dict[str, Any]:
        return dict(status=Status.RUNNING.value, attempt=jobs.c.attempt + 1,
                    started_at=self._clock, error=None)

    @functools.cached_property
    def _claim_sql(self) -> sa.Update:
        return self._claim_update(status=Status.QUEUED.value).returning(jobs.c.id)

    @functools.cached_property
    def _claim_start_sql(self) -> sa.Update:
        """Claim and start in one statement: PENDING -> RUNNING. The event
        trigger still records the claim (QUEUED) before the start."""
        return self._claim_update(**self._start_values()).returning(*_STARTED)

    # PostgreSQL's round in one statement. The greedy fit of `_fitting` is
    # decided in SQL for the common case, jobs with the default needs on a
    # node whose running jobs all have them: such jobs fit while default
    # slots are free, so the due ones are taken in order up to the first job
    # with other needs. Whatever SQL cannot decide is left to the fit in
    # Python, in the same transaction.

    def _plain_claim_sql(self, finish: bool, most: int, slots: int) -> sa.Update:
        """`_plain_claim_query`, with or without the finish CTE, built once
        per `most` and `slots`: written into the SQL, not bound, so that the
        prepared statement's generic plan knows its LIMIT (for a bound one
        PostgreSQL guesses a tenth of the table, which can make the generic
        plan look worse than planning anew each round, or pick a plan made
        for that many rows)."""
        key = (finish, most, slots)
        if key not in self._plain_claims:
            finished_ids = None
            if finish:
                finished = self._final_sql.cte("finished")
                finished_ids = sa.select(finished.c.id)
            self._plain_claims[key] = self._plain_claim_query(finished_ids, most, slots)
        return self._plain_claims[key]

    def _plain_claim_query(self, finished_ids: sa.Select | None, most: int,
                           slots: int) -> sa.Update:
        """Claim and start due jobs with the default needs, best first: at
        most `most` of them, as many as the node has default `slots` free,
        up to the first job with other needs; none when a job of the node
        has other needs. The candidates locked are the first `most`.
        Each row started also returns its place in the queue and the
        node's use (`in_use`) before the round."""
        most_sql = sa.literal_column(str(int(most)), sa.Integer)
        slots_sql = sa.literal_column(str(int(slots)), sa.Integer)
        in_use = sa.select(
            sa.func.count().label("jobs"),
            sa.func.coalesce(sa.func.bool_and(_default_needs(_active.c.needs)), True).label("plain"),
        ).where(*self._node_jobs(finished_ids)).cte("in_use").prefix_with("MATERIALIZED")  # once
        candidates = (
            sa.select(jobs.c.id, jobs.c.needs, jobs.c.priority, jobs.c.run_at)
            .where(*self._due())
            .order_by(*_ORDER).limit(most_sql)
            .with_for_update(skip_locked=True, of=jobs)
            .cte("candidates"))
        c = candidates.c
        ranked = sa.select(
            c.id, _default_needs(c.needs).label("plain"),
            sa.func.row_number().over(order_by=(c.priority.desc(), c.run_at, c.id)).label("place"),
        ).cte("ranked")
        first_other = sa.select(sa.func.min(ranked.c.place)).where(
            sa.not_(ranked.c.plain)).scalar_subquery()
        chosen = sa.select(ranked.c.id, ranked.c.place, in_use.c.jobs).where(
            in_use.c.plain,
            ranked.c.place <= slots_sql - in_use.c.jobs,
            ranked.c.place < sa.func.coalesce(first_other, most_sql + 1),
        ).cte("chosen")
        return (self._claim_update(jobs.c.id == chosen.c.id, **self._start_values())
                .returning(*_STARTED, chosen.c.place, chosen.c.jobs.label("in_use")))

    def _json_array(self, column: sa.ColumnElement) -> sa.ColumnElement:
        if self.is_postgres:
            return sa.func.json_agg(column, type_=sa.JSON)
        return sa.func.json_group_array(sa.func.json(column), type_=sa.JSON)

    def jobs_start(self, runner_id: int, ids: Sequence[int]) -> list[Job]:
        """QUEUED -> RUNNING (attempt + 1) for this runner's jobs.

        A job canceled while QUEUED is not started: it ends CANCELED here.
        Returns the jobs that did start.
        """
        if not ids:
            return []
        with self._tx() as conn:
            return self._start_in(conn, runner_id, ids)

    def _start_in(self, conn: sa.Connection, runner_id: int, ids: Sequence[int]) -> list[Job]:
        now = self._now()
        rows = conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.runner_id == runner_id,
                   jobs.c.status == Status.QUEUED.value)
            .values(status=Status.RUNNING.value, attempt=jobs.c.attempt + 1,
                    started_at=now, updated_at=now, error=None)
            .returning(*jobs.c)
        ).all()
        if len(rows) < len(ids):
            self._cancel_unstarted(conn, runner_id, ids)
        return [_job(r) for r in rows]

    def _cancel_unstarted(self, conn: sa.Connection, runner_id: int, ids: Sequence[int]) -> None:
        now = self._now()
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.runner_id == runner_id,
                   jobs.c.status == Status.TO_CANCEL.value, jobs.c.started_at.is_(None))
            .values(status=Status.CANCELED.value, finished_at=now, updated_at=now,
                    error="canceled before it started")
        )

    def jobs_unclaim(self, runner_id: int, ids: Sequence[int] | None = None) -> int:
        """Put back QUEUED jobs this runner did not start (all, or `ids`).

        One canceled meanwhile ends CANCELED. Returns how many went back.
        """
        with self._tx() as conn:
            where = [_held_by(runner_id), jobs.c.status == Status.QUEUED.value]
            if ids is not None:
                where.append(jobs.c.id.in_(ids))
            result = conn.execute(
                sa.update(jobs).where(*where)
                .values(status=Status.PENDING.value, runner_id=None, node=None,
                        queued_at=None, updated_at=self._now())
            )
            unstarted = sa.select(jobs.c.id).where(
                _held_by(runner_id), jobs.c.status == Status.TO_CANCEL.value,
                jobs.c.started_at.is_(None))
            self._cancel_unstarted(conn, runner_id, list(conn.execute(unstarted).scalars()))
            return result.rowcount

    def jobs_finish(self, runner_id: int, results: Sequence[tuple[Job, Outcome, float | None]]
                    ) -> list[int]:
        """Record outcomes of this runner's RUNNING (or TO_CANCEL) jobs.

        Each result is (job, outcome, retry_in): retry_in seconds puts the job
        back to PENDING for another attempt, None makes the outcome final.
        Jobs with the same plain outcome share one statement. A job being
        canceled that failed ends CANCELED and is not retried. Returns the ids
        written (a job whose status changed under it is left alone).
        """
        with self._tx() as conn:
            return self._finish_in(conn, runner_id, results)[0]

    def _finish_in(self, conn: sa.Connection, runner_id: int,
                   results: Sequence[tuple[Job, Outcome, float | None]],
                   keep_largest: bool = False) -> tuple[list[int], "_Finish | None"]:
        """Write the outcomes; jobs with the same plain outcome share one
        statement. With `keep_largest`, the largest such group is not
        written but returned, for the claim's statement to write."""
        written: list[int] = []
        groups: dict[Status, list[int]] = {}
        for job, outcome, retry_in in results:
            if retry_in is not None:
                written += self._retry(conn, runner_id, job, outcome, retry_in)
            elif outcome == _PLAIN_OUTCOMES[outcome.status]:  # a plain outcome: batch it
                groups.setdefault(outcome.status, []).append(job.id)
            else:
                written += self._final(conn, runner_id, [job.id], outcome)
        kept = None
        if keep_largest and groups:
            kept = max(groups, key=lambda status: len(groups[status]))
        for status, ids in groups.items():
            if status is not kept:
                written += self._final(conn, runner_id, ids, Outcome(status))
        return written, (_Finish(groups[kept], Outcome(kept)) if kept else None)

    def runner_round(self, runner_id: int, node: str, capacity: Mapping[str, int],
                     results: Sequence[tuple[Job, Outcome, float | None]],
                     claim: bool, limit: int | None = None) -> list[Job]:
        """One runner round in one transaction: record `results` (as
        jobs_finish), then, if `claim`, claim what fits and start it in one
        statement (PENDING -> RUNNING; the trigger records QUEUED between).
        Returns the jobs started.

        One commit per round instead of three, and one statement that claims
        and starts, is what lets a runner keep up with short jobs.
        """
        with self._round_tx() as conn:
            # PostgreSQL: the claim's first statement also writes most of
            # the outcomes, one round trip less per round.
            _, finish = self._finish_in(conn, runner_id, results,
                                        keep_largest=claim and self.is_postgres)
            if not claim:
                return []
            started: list[Job] = []
            if self.is_postgres:
                started, decided = self._plain_claim(conn, runner_id, node, capacity, limit,
                                                     finish)
                if decided:
                    return started
                if limit is not None:
                    limit -= len(started)
            chosen, _ = self._choose(conn, node, capacity, limit)
            if not chosen:
                return started
            rows = self._driver_run(conn, self._claim_start_sql, ids=chosen,
                                    runner=runner_id, node_name=node)
        by_id = {row[0]: self._started(row, runner_id, node) for row in rows}
        return started + [by_id[job_id] for job_id in chosen if job_id in by_id]

    def _plain_claim(self, conn: sa.Connection, runner_id: int, node: str,
                     capacity: Mapping[str, int], limit: int | None,
                     finish: "_Finish | None") -> tuple[list[Job], bool]:
        """PostgreSQL: write `finish` and claim and start jobs with the
        default needs in one statement (see `_plain_claim_query`). Returns
        the jobs started, best first, and whether that decided the round:
        every free slot (or `limit`) filled. Else the fit in Python goes on
        from there."""
        slots = capacity.get("default", 0)
        most = slots if limit is None else min(slots, limit)
        params: dict[str, Any] = {"runner": runner_id, "node_name": node}
        if finish:
            params.update(self._final_params(runner_id, finish.ids, finish.outcome))
        statement = self._plain_claim_sql(finish is not None, most, slots)
        rows = sorted(self._driver_run(conn, statement, **params), key=lambda row: row[8])
        started = [self._started(row, runner_id, node) for row in rows]
        free = min(most, slots - rows[0][9]) if rows else None  # place, in_use
        return started, free is not None and len(started) >= free

    def _final(self, conn: sa.Connection, runner_id: int, ids: list[int],
               outcome: Outcome) -> list[int]:
        rows = self._driver_run(conn, self._final_sql,
                                **self._final_params(runner_id, ids, outcome))
        return [job_id for job_id, in rows]

    @staticmethod
    def _final_params(runner_id: int, ids: list[int], outcome: Outcome) -> dict[str, Any]:
        # A FAILURE of a job being canceled ends CANCELED, unless the
        # outcome must be kept as it is.
        cancel_wins = (outcome.status in (Status.FAILURE, Status.CANCELED)
                       and not outcome.keep_status)
        return dict(ids=ids, runner=runner_id, b_status=outcome.status.value,
                    cancel_wins=cancel_wins, b_output=outcome.output, b_error=outcome.error,
                    b_peak_rss_kb=outcome.peak_rss_kb)

    @functools.cached_property
    def _final_sql(self) -> sa.Update:
        now = self._clock
        canceling = _status_is(jobs.c.status, _TO_CANCEL)
        status = sa.case((sa.and_(canceling, sa.bindparam("cancel_wins", type_=sa.Boolean)),
                          Status.CANCELED.value), else_=sa.bindparam("b_status"))
        # A job that ended in its runner did not take the runner down: its
        # count of crashes in a row starts again.
        return (
            sa.update(jobs)
            .where(self._id_in_ids(), jobs.c.runner_id == sa.bindparam("runner"),
                   _status_is(jobs.c.status, _RUNNING))
            .values(status=status, finished_at=now, updated_at=now, crashes=0,
                    pgid=None, pgid_runner=None,
                    output=sa.bindparam("b_output"), error=sa.bindparam("b_error"),
                    peak_rss_kb=sa.func.coalesce(sa.bindparam("b_peak_rss_kb", type_=sa.BigInteger),
                                                 jobs.c.peak_rss_kb))
            .returning(jobs.c.id))

    def _id_in_ids(self) -> sa.ColumnElement:
        """`jobs.id` in the `ids` parameter: one array on PostgreSQL, so one
        prepared statement serves any number of ids."""
        if self.is_postgres:
            return jobs.c.id == sa.any_(sa.bindparam("ids", type_=sa.ARRAY(sa.BigInteger)))
        return jobs.c.id.in_(sa.bindparam("ids", expanding=True))

    def _retry(self, conn: sa.Connection, runner_id: int, job: Job, outcome: Outcome,
               retry_in: float) -> list[int]:
        result = conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job.id, jobs.c.runner_id == runner_id,
                   jobs.c.status == Status.RUNNING.value)
            .values(status=Status.PENDING.value, run_at=self._now_plus(retry_in),
                    runner_id=None, node=None, queued_at=None, output=outcome.output,
                    error=outcome.error, crashes=0, pgid=None, pgid_runner=None,
                    updated_at=self._now())
            .returning(jobs.c.id)
        )
        ids = list(result.scalars())
        if not ids:  # canceled meanwhile: never retried
            return self._final(conn, runner_id, [job.id], Outcome(Status.CANCELED, error=outcome.error))
        return ids

    def job_progress(self, job_id: int, done: float | None, total: float | None,
                     message: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id)
                .values(progress_done=done, progress_total=total, progress_message=message)
            )

    def jobs_expire(self) -> int:
        """PENDING jobs past their max_start_at -> EXPIRED."""
        with self._tx() as conn:
            now = self._now()
            return conn.execute(
                sa.update(jobs)
                .where(_status_is(jobs.c.status, _PENDING), jobs.c.max_start_at < now)
                .values(status=Status.EXPIRED.value, finished_at=now, updated_at=now,
                        error="not started before its max start time")
            ).rowcount

    def jobs_canceling(self, runner_id: int) -> list[int]:
        """Ids of this runner's jobs a person asked to cancel."""
        with self._tx() as conn:
            return list(conn.execute(
                sa.select(jobs.c.id).where(_held_by(runner_id),
                                           jobs.c.status == Status.TO_CANCEL.value)
            ).scalars())

    def job_cancel(self, job_id: int) -> Status:
        """HELD/PENDING -> CANCELED; QUEUED/RUNNING -> TO_CANCEL.

        Returns the new status. Raises NotFound, or Conflict for a final job.
        """
        with self._tx() as conn:
            now = self._now()
            at_once = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id,
                       jobs.c.status.in_([Status.HELD.value, Status.PENDING.value]))
                .values(status=Status.CANCELED.value, finished_at=now, updated_at=now,
                        error="canceled before it started")
            ).rowcount
            if at_once:
                return Status.CANCELED
            later = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id,
                       jobs.c.status.in_([Status.QUEUED.value, Status.RUNNING.value]))
                .values(status=Status.TO_CANCEL.value, updated_at=now)
            ).rowcount
            if later:
                self._notify(conn, "cancel")
                return Status.TO_CANCEL
            current = conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if current is None:
            raise NotFound(f"job {job_id} does not exist")
        if current == Status.TO_CANCEL.value:
            return Status.TO_CANCEL
        raise Conflict(f"job {job_id} is {current}: it cannot be canceled")

    # -- reading ------------------------------------------------------------------

    def job_get(self, job_id: int) -> Job:
        """The job; raises NotFound."""
        with self._tx() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        return _job(row)

    def job_status(self, job_id: int) -> Status:
        with self._tx() as conn:
            value = conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if value is None:
            raise NotFound(f"job {job_id} does not exist")
        return Status(value)

    def job_events(self, job_id: int) -> list[Event]:
        """The job's timeline, oldest first; empty for an unknown job.

        A submit stores no event (migration 0004): its line is built from
        the job's row, with the status the job's first change started from.
        A job submitted before 0004 has it stored, as the event with no
        previous status."""
        with self._tx() as conn:
            job = conn.execute(sa.select(jobs.c.created_at, jobs.c.status)
                               .where(jobs.c.id == job_id)).first()
            rows = conn.execute(
                sa.select(job_events).where(job_events.c.job_id == job_id)
                .order_by(job_events.c.id)
            ).all()
        changes = [Event(r.at, Status(r.status), Status(r.previous) if r.previous else None,
                         r.runner_id, r.attempt, r.note) for r in rows]
        if job is None or (changes and changes[0].previous is None):
            return changes
        first = changes[0].previous if changes else Status(job.status)
        return [Event(job.created_at, first, None, None, 0, None), *changes]

    def jobs_list(self, statuses: Sequence[Status] = (), action: str | None = None,
                  limit: int = 50) -> list[Job]:
        """Jobs, newest first."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if statuses:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        if action:
            query = query.where(jobs.c.action == action)
        with self._tx() as conn:
            return [_job(r) for r in conn.execute(query)]

    def jobs_count_active(self, node: str) -> int:
        with self._tx() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(jobs)
                .where(jobs.c.node == node, _status_is(jobs.c.status, ACTIVE_STATUSES))
            ).scalar_one()

    # -- runners --------------------------------------------------------------------

    def runner_register(self, node: str, pid: int, boot_id: str | None,
                        deadline: dt.datetime | None, version: str) -> int:
        with self._tx() as conn:
            now = self._now()
            return conn.execute(
                sa.insert(runners)
                .values(node=node, pid=pid, boot_id=boot_id, state="claiming",
                        started_at=now, heartbeat_at=now, deadline=deadline, version=version)
                .returning(runners.c.id)
            ).scalar_one()

    def runner_heartbeat(self, runner_id: int) -> bool:
        """Record that the runner lives. False if it was declared dead (its
        jobs rescued): nothing is written then, and the runner must stop."""
        with self._tx() as conn:
            return conn.execute(
                sa.update(runners).where(runners.c.id == runner_id, runners.c.state != "dead")
                .values(heartbeat_at=self._now())).rowcount == 1

    def runner_set_state(self, runner_id: int, state: str) -> None:
        with self._tx() as conn:
            now = self._now()
            values: dict[str, Any] = {"state": state, "heartbeat_at": now}
            if state == "exited":
                values["exited_at"] = now
            # A runner declared dead stays dead: its jobs are someone else's.
            conn.execute(sa.update(runners).where(runners.c.id == runner_id,
                                                  runners.c.state != "dead").values(**values))

    def runners_list(self, limit: int = 100) -> list[RunnerRow]:
        with self._tx() as conn:
            now = self.db_now(conn)
            rows = conn.execute(
                sa.select(runners).order_by(runners.c.id.desc()).limit(limit)).all()
            active = conn.execute(
                sa.select(jobs.c.runner_id, jobs.c.id)
                .where(_status_is(jobs.c.status, ACTIVE_STATUSES),
                       jobs.c.runner_id.in_([r.id for r in rows]))
                .order_by(jobs.c.id)).all()
        running: dict[int, list[int]] = {}
        for runner_id, job_id in active:
            running.setdefault(runner_id, []).append(job_id)
        return [RunnerRow(**r._asdict(),
                          heartbeat_age=(now - r.heartbeat_at).total_seconds(),
                          running=tuple(running.get(r.id, ()))) for r in rows]


    # -- rescue of dead runners ---------------------------------------------------

    def runners_alive(self) -> list[RunnerRow]:
        """Runners not known to have ended (claiming or draining), with
        their heartbeat age on the database's clock."""
        with self._tx() as conn:
            now = self.db_now(conn)
            rows = conn.execute(
                sa.select(runners).where(runners.c.state.in_(["claiming", "draining"]))
                .order_by(runners.c.id)).all()
        return [RunnerRow(**r._asdict(), heartbeat_age=(now - r.heartbeat_at).total_seconds(),
                          running=()) for r in rows]

    def node_boot_ids(self, node: str) -> str | None:
        """The boot id of the newest runner of `node`: its host's current boot."""
        with self._tx() as conn:
            return conn.execute(
                sa.select(runners.c.boot_id).where(runners.c.node == node)
                .order_by(runners.c.id.desc()).limit(1)).scalar()

    def runner_rescue(self, runner_id: int, reason: str, crash_limit: int,
                      count_crash: bool, stale_after: float | None = None,
                      hold_groups: float | None = None) -> dict[str, list[int]] | None:
        """Declare a runner dead and rescue its jobs, in one transaction.

        QUEUED -> PENDING; TO_CANCEL -> CANCELED; RUNNING -> PENDING as a retry
        when retries are left, else ABANDONED; a job that took its runner
        down `crash_limit` times in a row -> ABANDONED. With `hold_groups`, a
        retry whose command's process group this runner recorded is due only
        that many seconds later: its old attempt may still run until someone
        on its node kills the group (`process_group_cleared` makes it due at
        once). Returns the job ids by what happened to them, or None if
        another runner rescued it first (or, with `stale_after`, if its
        heartbeat is no longer that old: the decision is re-checked in the
        same statement that makes it).
        """
        with self._tx() as conn:
            now = self._now()
            where = [runners.c.id == runner_id, runners.c.state.in_(["claiming", "draining"])]
            if stale_after is not None:
                where.append(runners.c.heartbeat_at < self._now_plus(-stale_after))
            claimed = conn.execute(
                sa.update(runners).where(*where)
                .values(state="dead", exited_at=now).returning(runners.c.id)).first()
            if claimed is None:
                return None
            mine = _held_by(runner_id)
            requeued = self._rescue_update(conn, mine, Status.QUEUED, dict(
                status=Status.PENDING.value, runner_id=None, node=None, queued_at=None))
            canceled = self._rescue_update(conn, mine, Status.TO_CANCEL, dict(
                status=Status.CANCELED.value, finished_at=now,
                error=f"canceled; {reason} before the job stopped"))
            crashes = jobs.c.crashes + (1 if count_crash else 0)
            poison = crashes >= crash_limit
            run_at = now
            if hold_groups:
                its_group = sa.and_(jobs.c.pgid.is_not(None), jobs.c.pgid_runner == runner_id)
                run_at = sa.case((its_group, self._now_plus(hold_groups)), else_=now)
            retried = self._rescue_update(
                conn, sa.and_(mine, jobs.c.attempt <= jobs.c.retries, sa.not_(poison)),
                Status.RUNNING, dict(status=Status.PENDING.value, runner_id=None, node=None,
                                     queued_at=None, run_at=run_at, crashes=crashes,
                                     error=f"{reason} while the job ran; retried"))
            poisoned = self._rescue_update(conn, sa.and_(mine, poison), Status.RUNNING, dict(
                status=Status.ABANDONED.value, finished_at=now, crashes=crashes,
                error=sa.literal(f"{reason} while the job ran; it took its runner down ")
                + sa.cast(crashes, sa.String) + " times in a row: not retried again"))
            abandoned = self._rescue_update(conn, mine, Status.RUNNING, dict(
                status=Status.ABANDONED.value, finished_at=now, crashes=crashes,
                error=f"{reason} while the job ran; no retries left"))
        return {"requeued": requeued, "canceled": canceled, "retried": retried,
                "abandoned": poisoned + abandoned}

    # -- process groups of commands (migration 0007) -------------------------------

    def job_process_group(self, job_id: int, runner_id: int, pgid: int) -> bool:
        """Record that the job's command runs in process group `pgid`, which
        `runner_id` started. False if the job is no longer this runner's (it
        was declared dead and the job rescued): the caller must stop the
        command at once. Commands only: callables record nothing."""
        with self._tx() as conn:
            return conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id, _held_by(runner_id),
                                      _status_is(jobs.c.status, _RUNNING))
                .values(pgid=pgid, pgid_runner=runner_id)).rowcount == 1

    def process_groups_of_dead(self, node: str) -> list[tuple[int, int, int, str | None]]:
        """(job id, pgid, runner id, the runner's boot id) of the process
        groups that runners of `node` declared dead had recorded and that no
        one has cleared yet (ix_jobs_process_group holds only these rows and
        the running commands')."""
        with self._tx() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(jobs.c.id, jobs.c.pgid, jobs.c.pgid_runner, runners.c.boot_id)
                .join(runners, runners.c.id == jobs.c.pgid_runner)
                .where(jobs.c.pgid.is_not(None), runners.c.node == node,
                       runners.c.state == "dead")
                .order_by(jobs.c.id))]

    def process_group_cleared(self, job_id: int, runner_id: int) -> bool:
        """The group `runner_id` recorded for the job is gone: forget it, and
        a retry held for it (`runner_rescue`'s `hold_groups`) is due now.
        False if the job has recorded another group since."""
        with self._tx() as conn:
            now = self._now()
            held = sa.and_(jobs.c.status == Status.PENDING.value, jobs.c.run_at > now)
            return conn.execute(
                sa.update(jobs).where(jobs.c.id == job_id, jobs.c.pgid_runner == runner_id,
                                      jobs.c.pgid.is_not(None))
                .values(pgid=None, pgid_runner=None,
                        run_at=sa.case((held, now), else_=jobs.c.run_at))).rowcount == 1

    def jobs_reconcile(self, runner_id: int, running_ids: Sequence[int]) -> int:
        """After the database came back: this runner's jobs that the database
        shows QUEUED or RUNNING but that it is not running (a claim or start
        whose answer was lost) go back to PENDING, their attempt undone;
        TO_CANCEL ones end CANCELED. Returns how many were put right."""
        with self._tx() as conn:
            now = self._now()
            mine = sa.and_(_held_by(runner_id), jobs.c.id.not_in(list(running_ids)))
            back = conn.execute(
                sa.update(jobs)
                .where(mine, jobs.c.status.in_([Status.QUEUED.value, Status.RUNNING.value]))
                .values(status=Status.PENDING.value, runner_id=None, node=None, queued_at=None,
                        started_at=None, updated_at=now,
                        attempt=sa.case((jobs.c.status == Status.RUNNING.value,
                                         jobs.c.attempt - 1), else_=jobs.c.attempt))).rowcount
            canceled = conn.execute(
                sa.update(jobs).where(mine, jobs.c.status == Status.TO_CANCEL.value)
                .values(status=Status.CANCELED.value, finished_at=now, updated_at=now,
                        error="canceled while its runner had lost the database")).rowcount
        return back + canceled

    def _rescue_update(self, conn: sa.Connection, where, status: Status,
                       values: dict[str, Any]) -> list[int]:
        return list(conn.execute(
            sa.update(jobs).where(where, jobs.c.status == status.value)
            .values(updated_at=self._now(), **values).returning(jobs.c.id)).scalars())


class Listener(threading.Thread):
    """LISTEN on its own connection; reconnects with backoff when it drops.
    Polling stays the fallback, so a lost notification only costs latency."""

    def __init__(self, engine: sa.engine.Engine, on_notify: Callable[[str], None]) -> None:
        super().__init__(name="listener", daemon=True)
        self.engine, self.on_notify = engine, on_notify
        self._stopped = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                self._listen()
                backoff = 0.5
            except Exception as exc:  # the database dropped us: retry, quietly
                log.debug("listener: %s; reconnecting in %.1fs", exc, backoff)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _listen(self) -> None:
        raw = self.engine.raw_connection()
        try:
            driver = raw.driver_connection
            driver.autocommit = True
            with driver.cursor() as cursor:
                cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
            while not self._stopped.is_set():
                if select.select([driver], [], [], 1.0)[0]:
                    driver.poll()
                    payloads = {n.payload for n in driver.notifies}
                    driver.notifies.clear()
                    for payload in payloads:
                        self.on_notify(payload)
        finally:
            raw.invalidate()  # never hand a LISTENing connection back to the pool

    def stop(self) -> None:
        self._stopped.set()


def _job(row: sa.Row) -> Job:
    values = row._asdict()
    values["status"] = Status(values["status"])
    values["needs"] = needs_of(values["needs"])
    values["params"] = values["params"] or {}
    for column in ("cron_id", "cron_fire_at", "crashes", "pgid", "pgid_runner"):
        values.pop(column, None)
    return Job(**values)


def _json_loads(text: str) -> Any:
    """json.loads, but the texts of no params and no needs, which most jobs
    have, are known: decoding them was a round's largest cost in Python."""
    if text == "{}":
        return {}
    return None if text == "null" else json.loads(text)


def _describe(exc: Exception) -> str:
    """One line about a driver error (raw, or wrapped by SQLAlchemy),
    without the SQL or any password."""
    orig = exc.orig if isinstance(exc, sa_exc.DBAPIError) else exc
    lines = str(orig).strip().splitlines() if orig else []
    return f"database error: {lines[0] if lines else type(exc).__name__}"


def _compile_for_driver(statement: sa.Executable, dialect: sa.Dialect, ids: int,
                        columns: tuple[str, ...], prepare: bool) -> _DriverSql:
    """See `_DriverSql`. For PostgreSQL's PREPARE the text has $1..$n: it
    is compiled by a new instance of the engine's dialect class that writes
    parameters that way."""
    if prepare:
        dialect = type(dialect)(paramstyle="numeric_dollar")
    compiled = statement.compile(dialect=dialect, column_keys=list(columns) or None)
    # Render what SQLAlchemy leaves to execution time: IN lists of values,
    # and an expanding `ids` as ids_1 .. ids_n (taken from the list in order).
    required = {name for name, bind in compiled.binds.items() if bind.required}
    given = {name: [0] * ids if name == "ids" else 0 for name in required}
    expanded = compiled.construct_expanded_state(compiled.construct_params(given))
    sql, names = expanded.statement, tuple(expanded.positiontup)
    fixed = {name: value for name, value in expanded.parameters.items()
             if name not in required and not name.startswith("ids_")}
    binds = {name: bind.type.dialect_impl(dialect) for name, bind in compiled.binds.items()}
    processors = {name: _empty_json_fast(process) if isinstance(impl, sa.JSON) else process
                  for name, impl in binds.items()
                  if (process := impl.bind_processor(dialect)) is not None}
    fixed = {name: processors[name](value) if name in processors else value
             for name, value in fixed.items()}
    if not prepare:
        return _DriverSql(sql, names, fixed, processors)
    name, prepare_sql, execute = _prepared(sql, names, binds, dialect)
    return _DriverSql(execute, names, fixed, processors, prepare_sql, name)


def _empty_json_fast(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A JSON parameter's processor that skips json.dumps for what most
    jobs hold: no params ({}) and no needs (None)."""
    empty, null = process({}), process(None)

    def fast(value: Any) -> Any:
        if value is None:
            return null
        if type(value) is dict and not value:
            return empty
        return process(value)
    return fast


def _prepared(sql: str, names: tuple[str, ...], binds: Mapping[str, sa.types.TypeEngine],
              dialect: sa.Dialect) -> tuple[str, str, str]:
    """PostgreSQL: the name, the PREPARE and the EXECUTE of `sql`. Each
    parameter is typed as SQLAlchemy types it; 'unknown' lets the server
    infer one. The name comes from the text, so a connection never holds
    two statements under one name."""
    types = []
    for name in names:
        try:
            types.append(binds[name].compile(dialect) if name in binds else "unknown")
        except sa_exc.CompileError:  # no type of its own (NullType)
            types.append("unknown")
    name = "runjobs_" + hashlib.sha1(sql.encode()).hexdigest()[:16]
    prepare = f"PREPARE {name} ({', '.join(types)}) AS {sql}"
    execute = f"EXECUTE {name} ({', '.join(['%s'] * len(names))})" if names else f"EXECUTE {name}"
    return name, prepare, execute


# -- building a store -------------------------------------------------------------

def _sqlite_engine(settings: Settings) -> sa.engine.Engine:
    url = sa.make_url(settings.database_url)
    if url.database and url.database != ":memory:":
        _prepare_sqlite_file(Path(url.database), settings)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                              json_deserializer=_json_loads)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's begin() emit our BEGIN: pysqlite's own would defer.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Take the write lock up front: a read-then-write transaction that
        # upgrades its lock later can fail at once instead of waiting.
        # Straight to the driver: through SQLAlchemy's execute it cost a
        # single submit a fifth of its time. Its errors (a lock held past
        # the busy timeout) still leave as SQLAlchemy's, as they did.
        try:
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise sa_exc.OperationalError("BEGIN IMMEDIATE", None, exc) from exc

    return engine


def _prepare_sqlite_file(path: Path, settings: Settings) -> None:
    """Create the folder and the database file with owner(-group) modes."""
    if not path.exists():
        settings.access.touch(path)


def make_engine(settings: Settings) -> sa.engine.Engine:
    use_dialect("sqlite" if settings.is_sqlite else "postgresql")
    if settings.is_sqlite:
        return _sqlite_engine(settings)
    # No bitmap scans in runjobs' sessions: right after a bulk submit the
    # statistics are stale and the planner picks a bitmap scan plus a sort
    # over the pending index for the claim. That never marks dead index
    # entries, so each claim re-reads every job claimed before it. Every
    # query of the store is served as well or better by a plain index scan.
    return sa.create_engine(
        settings.database_url, pool_size=4, max_overflow=8, json_deserializer=_json_loads,
        connect_args={"application_name": "runjobs", "connect_timeout": 10,
                      "options": "-c enable_bitmapscan=off"})


def open_store(settings: Settings, *, upgrade: bool = True) -> Store:
    """A store on the configured database, its schema at head.

    The embedded SQLite default upgrades its own schema; PostgreSQL never
    changes schema unasked: SchemaError names the command that fixes it.
    StoreError when the database cannot be reached.
    """
    store = Store(make_engine(settings), settings)
    revision = store.schema_revision()
    if revision == HEAD_REVISION:
        return store
    if settings.is_sqlite and upgrade:
        from . import migrate  # Alembic is heavy: only when there is work for it.
        migrate.upgrade(store)
        return store
    where = mask_url(settings.database_url)
    if revision is None:
        raise SchemaError(f"{where} has no runjobs schema: run `runjobs db upgrade`")
    raise SchemaError(
        f"{where} is at schema revision {revision}, this runjobs needs {HEAD_REVISION}: "
        "run `runjobs db upgrade`")
