"""The one seam between SQLite and PostgreSQL.

`dialect_for(url)` picks a dialect once, when the store is built; every
difference between the two databases lives in these two classes, and nothing
else in runjobs asks which database it talks to:

| | SQLite | PostgreSQL |
| --- | --- | --- |
| "now" | the host's clock, passed in (one host) | the database's `statement_timestamp()` |
| writers | `BEGIN IMMEDIATE`: the write lock up front | row locks, `FOR UPDATE SKIP LOCKED` |
| reads | a deferred `BEGIN`: no write lock | `BEGIN READ ONLY` |
| hot statements | plain text on the cursor | prepared once per connection |
| inserted ids | the cursor's `lastrowid` | `RETURNING` |
| JSON on the driver's cursor | text, decoded here | decoded by psycopg2 |
| id lists | an expanding `IN` | one array parameter (`= ANY`) |
| autocommit | sqlite3 is always in it | set on the driver, and reset |
| waking runners | they poll | `NOTIFY`, and a `LISTEN` thread |
| the round | the fit in Python | one statement for plain jobs first |
| schema | upgrades itself on first use | only when asked (`db upgrade`) |
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..config import Settings
from ..errors import ConfigError
from ..schema import UtcDateTime, use_dialect
from .driver import json_loads

if TYPE_CHECKING:
    from .listen import Listener

NOTIFY_CHANNEL = "runjobs"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Dialect:
    """What the two databases share; the subclasses say where they differ."""

    name: str
    # 'now' in a statement built once: a parameter that `clock_params` fills
    # (SQLite), or the database's clock.
    clock: sa.ColumnElement
    prepares_statements: bool     # hot statements as PREPAREd statements
    insert_returns_ids: bool      # INSERT ... RETURNING, else the cursor's lastrowid
    one_statement_round: bool     # claims plain jobs in the round's first statement
    upgrades_itself: bool         # creates and upgrades its own schema on first use
    read_options: dict[str, Any]  # execution options of a read transaction

    def create_engine(self, settings: Settings) -> sa.engine.Engine:
        raise NotImplementedError

    def clock_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with what `clock` needs (a statement built once)."""
        return params

    def json_from_driver(self, value: Any) -> Any:
        """A JSON column read on the driver's cursor."""
        return value

    @contextlib.contextmanager
    def autocommit(self, driver_connection: Any) -> Iterator[None]:
        """Statements on the driver's cursor commit by themselves inside."""
        yield

    def keep_in_autocommit(self, driver_connection: Any) -> None:
        """Leave the connection in autocommit for good (the kept submit one)."""

    def notify(self, conn: sa.Connection, what: str) -> None:
        """Wake listening runners at commit."""

    def listen(self, engine: sa.engine.Engine,
               on_notify: Callable[[str], None]) -> "Listener | None":
        """A started LISTEN thread, or None where runners poll."""
        return None

    def lock_candidates(self, query: sa.Select, table: sa.Table) -> sa.Select:
        """The claim's candidates, locked against other claimers (who skip
        them); SQLite's write lock already keeps them out."""
        return query

    def time_to_store(self, value: dt.datetime) -> dt.datetime:
        """An aware UTC time as the database stores it (schema.UtcDateTime)."""
        return value

    def time_bind_processor(self, utc_type: sa.TypeDecorator,
                            sa_dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        """A faster bind processor for UtcDateTime, or None for SQLAlchemy's."""
        return None


class SQLite(Dialect):
    """One host: its clock is the database's; writers queue on the file."""

    name = "sqlite"
    prepares_statements = False
    insert_returns_ids = False
    one_statement_round = False
    upgrades_itself = True
    # The begin listener reads this: a deferred BEGIN, no write lock.
    read_options = {"runjobs_read_only": True}

    def create_engine(self, settings: Settings) -> sa.engine.Engine:
        url = sa.make_url(settings.database_url)
        if url.database and url.database != ":memory:":
            _create_file(Path(url.database), settings)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  json_deserializer=json_loads)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    def now(self) -> sa.ColumnElement:
        return sa.literal(utcnow(), UtcDateTime)

    def now_plus(self, seconds: float) -> sa.ColumnElement:
        return sa.literal(utcnow() + dt.timedelta(seconds=seconds), UtcDateTime)

    @functools.cached_property
    def clock(self) -> sa.ColumnElement:
        return sa.bindparam("now", type_=UtcDateTime)

    def clock_params(self, params: dict[str, Any]) -> dict[str, Any]:
        params["now"] = utcnow()
        return params

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return utcnow()

    def json_from_driver(self, value: Any) -> Any:
        return None if value is None else json_loads(value)

    def time_to_store(self, value: dt.datetime) -> dt.datetime:
        return value.replace(tzinfo=None)  # no time zone in SQLite: naive UTC

    def time_bind_processor(self, utc_type: sa.TypeDecorator,
                            sa_dialect: sa.Dialect) -> Callable[[Any], Any]:
        """The text SQLAlchemy's DATETIME stores ('2026-11-22
        10:00:00.000000'), written by isoformat: SQLAlchemy's own formatting
        took 2 us of a 30 us single submit."""
        def process(value):
            if value is not None and value.tzinfo is dt.timezone.utc:  # utcnow()'s: most times
                return value.isoformat(" ", "microseconds")[:-6]  # less '+00:00'
            value = utc_type.process_bind_param(value, sa_dialect)
            return None if value is None else value.isoformat(" ", "microseconds")
        return process

    def json_array(self, column: sa.ColumnElement) -> sa.ColumnElement:
        return sa.func.json_group_array(sa.func.json(column), type_=sa.JSON)

    def id_in_ids(self, column: sa.ColumnElement) -> sa.ColumnElement:
        return column.in_(sa.bindparam("ids", expanding=True))


class PostgreSQL(Dialect):
    """Many hosts: the database's clock, row locks, NOTIFY."""

    name = "postgresql"
    prepares_statements = True
    insert_returns_ids = True
    one_statement_round = True
    upgrades_itself = False
    read_options = {"postgresql_readonly": True}

    def create_engine(self, settings: Settings) -> sa.engine.Engine:
        # No bitmap scans in runjobs' sessions: right after a bulk submit the
        # statistics are stale and the planner picks a bitmap scan plus a
        # sort over the pending index for the claim. That never marks dead
        # index entries, so each claim re-reads every job claimed before it.
        # Every query of the store is served as well or better by a plain
        # index scan.
        return sa.create_engine(
            settings.database_url, pool_size=4, max_overflow=8, json_deserializer=json_loads,
            connect_args={"application_name": "runjobs", "connect_timeout": 10,
                          "options": "-c enable_bitmapscan=off"})

    def now(self) -> sa.ColumnElement:
        return sa.func.statement_timestamp(type_=UtcDateTime)

    def now_plus(self, seconds: float) -> sa.ColumnElement:
        return self.now() + sa.literal(dt.timedelta(seconds=seconds), sa.Interval)

    @functools.cached_property
    def clock(self) -> sa.ColumnElement:
        return self.now()

    def db_now(self, conn: sa.Connection) -> dt.datetime:
        return conn.execute(sa.select(self.now())).scalar_one()

    @contextlib.contextmanager
    def autocommit(self, driver_connection: Any) -> Iterator[None]:
        # Set on the driver: SQLAlchemy's AUTOCOMMIT option (the isolation
        # level set, then reset on return) cost about 60 us a submit.
        driver_connection.autocommit = True
        try:
            yield
        finally:
            if not driver_connection.closed:
                driver_connection.autocommit = False

    def keep_in_autocommit(self, driver_connection: Any) -> None:
        driver_connection.autocommit = True

    def notify(self, conn: sa.Connection, what: str) -> None:
        conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, what)))

    def listen(self, engine: sa.engine.Engine,
               on_notify: Callable[[str], None]) -> "Listener":
        from .listen import Listener

        listener = Listener(engine, NOTIFY_CHANNEL, on_notify)
        listener.start()
        return listener

    def lock_candidates(self, query: sa.Select, table: sa.Table) -> sa.Select:
        return query.with_for_update(skip_locked=True, of=table)

    def json_array(self, column: sa.ColumnElement) -> sa.ColumnElement:
        return sa.func.json_agg(column, type_=sa.JSON)

    def id_in_ids(self, column: sa.ColumnElement) -> sa.ColumnElement:
        # One array: one prepared statement serves any number of ids.
        return column == sa.any_(sa.bindparam("ids", type_=sa.ARRAY(sa.BigInteger)))


_DIALECTS = {"sqlite": SQLite(), "postgresql": PostgreSQL()}


def dialect_for(database_url: str) -> Dialect:
    """The dialect of a database URL; ConfigError for one runjobs does not
    support. The one place that tells the two databases apart."""
    scheme = database_url.partition(":")[0].partition("+")[0]
    if scheme not in _DIALECTS:
        raise ConfigError(f"database_url: runjobs supports sqlite:// and postgresql:// URLs, "
                          f"not {scheme}://")
    use_dialect(scheme)
    return _DIALECTS[scheme]


def dialect_named(name: str) -> Dialect:
    """The dialect of SQLAlchemy's dialect `name` (for schema.UtcDateTime)."""
    return _DIALECTS[name]


def _create_file(path: Path, settings: Settings) -> None:
    """Create the folder and the database file with owner(-group) modes."""
    if not path.exists():
        settings.access.touch(path)


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's begin() emit our BEGIN: pysqlite's own would defer.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    """A write transaction takes the write lock up front: a read-then-write
    transaction that upgraded its lock later could fail at once instead of
    waiting. A read (`read_options`) takes none: in WAL mode it neither
    waits for writers nor holds them up.

    Straight to the driver: through SQLAlchemy's execute it cost a single
    submit a fifth of its time. Its errors (a lock held past the busy
    timeout) still leave as SQLAlchemy's."""
    begin = "BEGIN" if conn.get_execution_options().get("runjobs_read_only") else "BEGIN IMMEDIATE"
    try:
        conn.connection.driver_connection.execute(begin)
    except sqlite3.Error as exc:
        raise sa_exc.OperationalError(begin, None, exc) from exc
