"""Connections and transactions: what every query module of the store
builds on. Driver errors leave here as StoreError, so nothing above the
store catches a psycopg2, sqlite3 or SQLAlchemy exception.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..config import Settings
from ..errors import StoreError
from .dialect import dialect_for
from .driver import DriverSql, compile_for_driver, describe


class Connections:
    """The engine, the connections the store keeps, and how a statement runs."""

    def __init__(self, engine: sa.engine.Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.dialect = dialect_for(settings.database_url)
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
                                tuple[sa.Executable, DriverSql]] = {}

    # -- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        """One write transaction; driver errors leave as StoreError."""
        try:
            with self.engine.begin() as conn, self._dropped_if_lost(conn):
                yield conn
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            raise StoreError(describe(exc)) from exc

    @contextlib.contextmanager
    def _read_tx(self) -> Iterator[sa.Connection]:
        """One read transaction: on SQLite it takes no write lock, so reads
        never queue behind (or hold up) a runner's claims; on PostgreSQL it
        is READ ONLY."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**self.dialect.read_options)
                with conn.begin(), self._dropped_if_lost(conn):
                    yield conn
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            raise StoreError(describe(exc)) from exc

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
            raise StoreError(describe(exc)) from exc

    def _drop_round_conn(self) -> None:
        conn, self._round_conn = self._round_conn, None
        if conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                conn.invalidate()

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

    # -- autocommit, for single submits ------------------------------------------

    @contextlib.contextmanager
    def _pooled_autocommit(self) -> Iterator[sa.Connection]:
        """A connection from the pool whose statements, run on the driver's
        cursor, each commit by themselves; handed back as it came."""
        try:
            with self.engine.connect() as conn, self._dropped_if_lost(conn):
                with self.dialect.autocommit(conn.connection.driver_connection):
                    yield conn
        except (sa_exc.DBAPIError, self._driver_error) as exc:
            raise StoreError(describe(exc)) from exc

    def _kept_autocommit(self) -> sa.Connection:
        """The connection the store keeps for single submits (hold
        `_autocommit_lock`), made on first use."""
        if self._autocommit_conn is None:
            try:
                conn = self.engine.connect()
            except sa_exc.DBAPIError as exc:
                raise StoreError(describe(exc)) from exc
            self.dialect.keep_in_autocommit(conn.connection.driver_connection)
            self._autocommit_conn = conn
        return self._autocommit_conn

    def _drop_autocommit_conn(self) -> None:
        """Close the kept connection for good: after an error it may be cut,
        and on PostgreSQL it must not go back to the pool in autocommit."""
        conn, self._autocommit_conn = self._autocommit_conn, None
        if conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError, self._driver_error):
                conn.invalidate()

    # -- running statements built once ----------------------------------------------

    def _driver_run(self, conn: sa.Connection, statement: sa.Executable,
                    columns: tuple[str, ...] = (), row_id: bool = False,
                    **params: Any) -> list[tuple]:
        """Execute a statement built once on the driver's cursor (see
        `DriverSql`); rows as plain tuples, JSON columns as the driver gives
        them (`dialect.json_from_driver`). An INSERT names the `columns` its
        parameters fill; with `row_id`, its one row is the cursor's
        lastrowid. Listeners of before_cursor_execute see it as usual."""
        params = self.dialect.clock_params(params)
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
                    columns: tuple[str, ...]) -> DriverSql:
        """`statement` compiled for the driver, with `ids` values for an
        expanding `ids` parameter; kept for the store's life."""
        key = (id(statement), ids, columns)
        if key not in self._driver_sqls:
            self._driver_sqls[key] = (statement, compile_for_driver(
                statement, self.engine.dialect, ids, columns,
                prepare=self.dialect.prepares_statements))
        return self._driver_sqls[key][1]

    # -- the database itself ------------------------------------------------------------

    def db_now(self, conn: sa.Connection | None = None) -> dt.datetime:
        """'Now' on the clock job times are kept by: the database's."""
        if conn is not None:
            return self.dialect.db_now(conn)
        with self._read_tx() as own:
            return self.dialect.db_now(own)

    def listen(self, on_notify: Callable[[str], None]):
        """Call `on_notify(payload)` from a thread for each NOTIFY: 'submit'
        or 'cancel'. None where runners poll (SQLite)."""
        return self.dialect.listen(self.engine, on_notify)

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at; None for an empty one."""
        with self._read_tx() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    def dispose(self) -> None:
        with self._autocommit_lock:
            self._drop_autocommit_conn()
        if self._round_conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                self._round_conn.close()
            self._round_conn = None
        self.engine.dispose()
