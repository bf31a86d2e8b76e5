"""The databases the benchmark runs on: a fresh one per workload run.

The schema is built once per database kind by `runjobs db upgrade` (so the
benchmark measures the schema the migrations really make) and then copied for
each run: a file copy on SQLite, `CREATE DATABASE ... TEMPLATE` on PostgreSQL.
That keeps a fresh database to a fraction of a second instead of an Alembic
run each time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
from pathlib import Path
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg2

import runjobs

REPO = Path(__file__).resolve().parent.parent
SETUP_TIMEOUT = 120          # seconds for `runjobs db upgrade` and friends
CHUNK = 1000                 # jobs per submit_many transaction when filling a queue


def to_epoch(value: Any) -> float | None:
    """A time read from either database as seconds since the epoch. SQLite
    holds naive UTC text (see runjobs.schema.UtcDateTime); psycopg2 gives
    aware datetimes."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.timestamp()


class Db:
    """One fresh database and a RUNJOBS_HOME of its own (lock file, logs), so
    runs never share a lock or a runner log."""

    def __init__(self, kind: str, url: str, home: Path, config: Path) -> None:
        self.kind, self.url, self.home, self.config = kind, url, home, config

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgresql"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a runjobs process on this database. The config
        file is an empty one of ours and /etc/default/runjobs is not read, so
        nothing on the host changes what is measured."""
        env = dict(os.environ)
        env.update(RUNJOBS_HOME=str(self.home), RUNJOBS_DATABASE_URL=self.url,
                   RUNJOBS_CONFIG=str(self.config), RUNJOBS_DEFAULTS="/nonexistent",
                   RUNJOBS_NODE="bench", PYTHONPATH=str(REPO))
        env.update(extra)
        return env

    def connect(self):
        """A plain DB-API connection, for the harness's own reads and writes."""
        if self.is_postgres:
            return psycopg2.connect(libpq_url(self.url))
        conn = sqlite3.connect(sqlite_path(self.url), timeout=30, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.is_postgres:
            sql = sql.replace("%s", "?")
        conn = self.connect()
        try:
            cursor = conn.cursor()
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            if self.is_postgres:
                conn.rollback()
            return rows
        finally:
            conn.close()


def libpq_url(url: str) -> str:
    """psycopg2 takes libpq URLs: drop a SQLAlchemy '+driver' suffix."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+")[0]))


def sqlite_path(url: str) -> str:
    return url.split(":///", 1)[1]


def runjobs_cli(*args: str, env: dict[str, str], timeout: float = SETUP_TIMEOUT,
                input: str | None = None) -> subprocess.CompletedProcess:
    """`python -m runjobs ARGS` with this interpreter, checked."""
    result = subprocess.run([sys.executable, "-m", "runjobs", *args], env=env, cwd=REPO,
                            input=input, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"runjobs {' '.join(args)} exited {result.returncode}: "
                           f"{result.stderr.strip()[-2000:]}")
    return result


class Target:
    """A kind of database (sqlite or postgresql) that hands out fresh ones."""

    def __init__(self, kind: str, root: Path, pg_url: str | None = None) -> None:
        self.kind, self.root, self.pg_url = kind, root, pg_url
        self.config = root / "runjobs.toml"
        self.config.touch()
        self._numbers = itertools.count(1)
        self._template: str | None = None
        self._created: list[str] = []

    # -- PostgreSQL server administration ------------------------------------

    def _pg_admin(self):
        """Autocommit connection to the database the URL names, which must
        exist: CREATE/DROP DATABASE cannot run in a transaction."""
        conn = psycopg2.connect(libpq_url(self.pg_url), connect_timeout=10)
        conn.autocommit = True
        return conn

    def _pg_name(self, suffix: str) -> str:
        base = urlsplit(self.pg_url).path.lstrip("/") or "runjobs_bench"
        # The pid keeps two benchmark runs on one server apart; PostgreSQL
        # names stop at 63 bytes.
        return f"{base[:40]}_{os.getpid()}_{suffix}"

    def _pg_url_of(self, name: str) -> str:
        parts = urlsplit(self.pg_url)
        return urlunsplit(parts._replace(path="/" + name))

    def _pg_create(self, name: str, template: str | None = None) -> None:
        conn = self._pg_admin()
        try:
            with conn.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cursor.execute(f'CREATE DATABASE "{name}"'
                               + (f' TEMPLATE "{template}"' if template else ""))
        finally:
            conn.close()
        self._created.append(name)

    def _pg_drop(self, name: str) -> None:
        conn = self._pg_admin()
        try:
            with conn.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()
        if name in self._created:
            self._created.remove(name)

    # -- fresh databases --------------------------------------------------------

    def _prepare_template(self) -> str:
        """Build the schema once with `runjobs db upgrade`."""
        home = self.root / "template-home"
        home.mkdir(exist_ok=True)
        if self.kind == "postgresql":
            name = self._pg_name("tmpl")
            self._pg_create(name)
            url = self._pg_url_of(name)
        else:
            url = f"sqlite:///{self.root / 'template.db'}"
        runjobs_cli("db", "upgrade", env=Db(self.kind, url, home, self.config).env())
        if self.kind == "sqlite":
            # Fold the WAL into the file so a plain copy is the whole database.
            conn = sqlite3.connect(sqlite_path(url))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            return sqlite_path(url)
        return name

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Db]:
        """A new database with the runjobs schema at head, removed afterwards."""
        if self._template is None:
            self._template = self._prepare_template()
        number = next(self._numbers)
        home = Path(tempfile.mkdtemp(prefix=f"run{number}-", dir=self.root))
        if self.kind == "postgresql":
            name = self._pg_name(str(number))
            self._pg_create(name, template=self._template)
            url = self._pg_url_of(name)
        else:
            path = home / "runjobs.db"
            shutil.copy(self._template, path)
            url = f"sqlite:///{path}"
        try:
            yield Db(self.kind, url, home, self.config)
        finally:
            if self.kind == "postgresql":
                self._pg_drop(name)
            shutil.rmtree(home, ignore_errors=True)

    def close(self) -> None:
        """Drop the template (and anything a failure left behind)."""
        if self.kind == "postgresql":
            for name in list(self._created):
                self._pg_drop(name)

    def server_version(self) -> str:
        if self.kind == "postgresql":
            conn = self._pg_admin()
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SHOW server_version")
                    return cursor.fetchone()[0]
            finally:
                conn.close()
        return sqlite3.sqlite_version


# -- the queue of a drain ---------------------------------------------------------------

def queue_noops(db: Db, count: int) -> int:
    """Queue `count` noop jobs in bulk (not timed), the same way for the
    engine's drain and the plain drains, and return the largest id before
    them. On PostgreSQL the table is then analyzed, so that both sides plan
    with the same, current statistics: right after a bulk insert they are
    stale, and a plain client planning on them got a bitmap scan and a sort
    for every claim (see "The bitmap scan" in docs/benchmarks.md)."""
    (before,), = db.query("SELECT COALESCE(MAX(id), 0) FROM jobs")
    client = runjobs.connect(db.url)
    try:
        for start in range(0, count, CHUNK):
            client.submit_many([{"action": "noop"}] * min(CHUNK, count - start))
    finally:
        client.close()
    if db.is_postgres:
        conn = db.connect()
        try:
            conn.autocommit = True
            conn.cursor().execute("ANALYZE jobs")
        finally:
            conn.close()
    return before


def finished_window(db: Db, after_id: int) -> tuple[int, float, float]:
    """Of the jobs with ids above `after_id`: how many ended SUCCESS, the
    first one's start and the last one's finish (epoch seconds, the
    database's clock on PostgreSQL). The engine's drain and the plain ones
    are both timed by this window, so neither counts its start-up."""
    (done, first_start, last_finish), = db.query(
        "SELECT COUNT(*), MIN(started_at), MAX(finished_at) FROM jobs "
        "WHERE status = 'SUCCESS' AND id > %s", (after_id,))
    return done, to_epoch(first_start), to_epoch(last_finish)


# -- bulk data, with plain SQL ------------------------------------------------------

FINISHED_COLUMNS = ("action, params, status, priority, attempt, retries, crashes, node, "
                    "run_at, created_at, queued_at, started_at, finished_at, updated_at")


def insert_finished(db: Db, count: int) -> None:
    """`count` SUCCESS jobs finished two days ago, inserted in one statement.

    job_events stays empty for them (a submit stores no event since
    migration 0004). On PostgreSQL session_replication_role = replica
    keeps the insert trigger's NOTIFY from waking anyone.
    """
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=2)
    conn = db.connect()
    try:
        cursor = conn.cursor()
        if db.is_postgres:
            cursor.execute("SET session_replication_role = replica")
            cursor.execute(
                f"INSERT INTO jobs ({FINISHED_COLUMNS}) "
                "SELECT 'noop', '{}', 'SUCCESS', 0, 1, 0, 0, 'bench', t, t, t, t, t, t "
                "FROM (SELECT %s::timestamptz + g * interval '1 ms' AS t "
                "      FROM generate_series(1, %s) AS g) AS s", (past, count))
            conn.commit()
            # A table holding a million finished jobs was vacuumed and
            # analyzed by autovacuum long ago; do it now, so the drain sees
            # real statistics and does not share the two cores with the
            # vacuum a million fresh rows set off.
            conn.autocommit = True
            cursor.execute("VACUUM (ANALYZE) jobs")
        else:
            stamp = past.replace(tzinfo=None).isoformat(sep=" ")
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(
                "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < ?) "
                f"INSERT INTO jobs ({FINISHED_COLUMNS}) "
                "SELECT 'noop', '{}', 'SUCCESS', 0, 1, 0, 0, 'bench', ?, ?, ?, ?, ?, ? FROM g",
                (count, *[stamp] * 6))
            cursor.execute("COMMIT")
            # Likewise their pages were copied from the WAL into the file
            # long ago: not by the drain's first checkpoint.
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
