"""The ceiling: the same queue work done with plain SQL, no engine.

It runs on the runjobs jobs table itself (a fresh database from the same
migrations, every index in place) with triggers off through
session_replication_role = replica, so no job_events rows and no NOTIFY: what
the database alone can do with this schema. The engine's figures are then
printed as ratios of these.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import psycopg2

from .dbs import Db, libpq_url, sqlite_path

THREADS = 8
ORDER = "ORDER BY priority DESC, run_at, id"


def _pg(db: Db):
    conn = psycopg2.connect(libpq_url(db.url))
    with conn.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
    conn.commit()
    return conn


def _fill(db: Db, count: int) -> None:
    conn = _pg(db)
    try:
        with conn.cursor() as cursor:
            cursor.execute("TRUNCATE jobs, job_events RESTART IDENTITY")
            cursor.execute(
                "INSERT INTO jobs (action, params, status, run_at, created_at, updated_at) "
                "SELECT 'noop', '{}', 'PENDING', now(), now(), now() "
                "FROM generate_series(1, %s)", (count,))
        conn.commit()
    finally:
        conn.close()


def _worker(db: Db, batch: int, errors: list) -> None:
    """Claim `batch` jobs per round trip until none is left, marking each
    claimed batch SUCCESS in a second round trip."""
    try:
        conn = _pg(db)
        claim = (
            "UPDATE jobs SET status = 'RUNNING', started_at = now(), updated_at = now() "
            "WHERE id = (SELECT id FROM jobs WHERE status = 'PENDING' "
            f"            {ORDER} LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
            if batch == 1 else
            "UPDATE jobs SET status = 'RUNNING', started_at = now(), updated_at = now() "
            "WHERE id IN (SELECT id FROM jobs WHERE status = 'PENDING' "
            f"             {ORDER} LIMIT {batch} FOR UPDATE SKIP LOCKED) RETURNING id")
        finish = ("UPDATE jobs SET status = 'SUCCESS', finished_at = now(), updated_at = now() "
                  "WHERE id = ANY(%s)")
        with conn.cursor() as cursor:
            while True:
                cursor.execute(claim)
                ids = [row[0] for row in cursor.fetchall()]
                conn.commit()
                if not ids:  # nothing unlocked is PENDING: the others hold the rest
                    break
                cursor.execute(finish, (ids,))
                conn.commit()
        conn.close()
    except Exception as exc:  # reported by the caller
        errors.append(exc)


def _drain(db: Db, jobs: int, batch: int) -> float:
    _fill(db, jobs)
    errors: list = []
    threads = [threading.Thread(target=_worker, args=(db, batch, errors)) for _ in range(THREADS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - start
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"ceiling drain: {errors or 'threads still running'}")
    (done,), = db.query("SELECT COUNT(*) FROM jobs WHERE status = 'SUCCESS'")
    if done != jobs:
        raise RuntimeError(f"ceiling drain: {done} of {jobs} jobs SUCCESS")
    return jobs / elapsed


class PlainInserts:
    """Single-row INSERTs of a PENDING job, each its own transaction, from
    one connection kept open: what a submit costs with no engine around it."""

    def __init__(self, db: Db) -> None:
        self.is_postgres = db.is_postgres
        if db.is_postgres:
            self.conn = _pg(db)
            self.sql = ("INSERT INTO jobs (action, params, status, run_at, created_at, "
                        "updated_at) VALUES ('noop', '{}', 'PENDING', now(), now(), now()) "
                        "RETURNING id")
        else:
            # The same pragmas as runjobs' own connections (runjobs/store.py).
            self.conn = sqlite3.connect(sqlite_path(db.url), isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
                self.conn.execute(f"PRAGMA {pragma}")
            now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
            self.sql = ("INSERT INTO jobs (action, params, status, run_at, created_at, "
                        f"updated_at) VALUES ('noop', '{{}}', 'PENDING', {now}, {now}, {now}) "
                        "RETURNING id")

    def seconds(self, count: int) -> float:
        """The time `count` inserts took."""
        cursor = self.conn.cursor()
        start = time.perf_counter()
        for _ in range(count):
            if not self.is_postgres:
                cursor.execute("BEGIN IMMEDIATE")
            cursor.execute(self.sql)
            cursor.fetchone()
            if self.is_postgres:
                self.conn.commit()
            else:
                cursor.execute("COMMIT")
        return time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()


def plain_insert(db: Db, count: int) -> float:
    """Plain inserts per second (see PlainInserts)."""
    inserts = PlainInserts(db)
    try:
        return count / inserts.seconds(count)
    finally:
        inserts.close()


def ceiling(db: Db, jobs: int, inserts: int) -> dict[str, float]:
    """PostgreSQL: drains claiming 1 and 50 jobs per round trip, and plain
    inserts. SQLite: plain inserts only (its writers are serialised anyway)."""
    if not db.is_postgres:
        return {"insert_per_s": plain_insert(db, inserts)}
    result = {"drain_1_per_s": _drain(db, jobs, 1), "drain_50_per_s": _drain(db, jobs, 50)}
    _fill(db, 0)
    result["insert_per_s"] = plain_insert(db, inserts)
    return result
