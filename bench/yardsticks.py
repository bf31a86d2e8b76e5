"""The yardsticks: the engine's queue work done by a plain client, no engine.

Each runs on a fresh database with the runjobs schema exactly as the
migrations make it: every index, and the event triggers on `jobs` firing as
they do for the engine (a claim writes QUEUED and RUNNING events, a finish
its final one, an insert sends the NOTIFY). Each PostgreSQL connection runs
in autocommit, so a statement is one round trip that commits by itself, and
with the session settings of runjobs' own engine (`make_engine` in
runjobs/store/dialect.py: no bitmap scans). Before issue 12 the yardsticks ran in
transactions (psycopg2 sends BEGIN, the statement and COMMIT: three round
trips per statement) with the triggers off, and the drain on the stale
statistics of a bulk insert with bitmap scans allowed: they measured a
handicapped client, and the engine's ratios to them flattered it.

What still differs, on purpose: the plain client sends its SQL as text (the
engine prepares its statements) and does not record a runner, a node or an
outcome's output, and it claims from 8 threads with a connection each where
the engine claims for 8 slots from one connection.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import psycopg2

from .dbs import Db, finished_window, libpq_url, queue_noops, sqlite_path

THREADS = 8
JOIN_TIMEOUT = 300           # seconds a plain drain may take
# runjobs' PostgreSQL sessions run with these (runjobs/store/dialect.py, PostgreSQL.create_engine).
PG_OPTIONS = "-c enable_bitmapscan=off"

# What the engine's claim asks for too (runjobs/store/claim.py, ClaimQueries._due and
# shared.ORDER): a due PENDING job, best first, none another session holds.
CANDIDATES = ("SELECT id FROM jobs WHERE status = 'PENDING' AND run_at <= now() "
              "AND (max_start_at IS NULL OR max_start_at > now()) "
              "ORDER BY priority DESC, run_at, id LIMIT {batch} FOR UPDATE SKIP LOCKED")
# Claim and start at once, as the engine's round does: queued_at is set
# because the update trigger dates the QUEUED event by it.
CLAIM = ("UPDATE jobs SET status = 'RUNNING', attempt = attempt + 1, queued_at = now(), "
         "started_at = now(), updated_at = now() "
         "WHERE id IN (" + CANDIDATES + ") RETURNING id")
FINISH = ("UPDATE jobs SET status = 'SUCCESS', finished_at = now(), updated_at = now() "
          "WHERE id = ANY(%s)")


def pg_connect(db: Db):
    """A plain psycopg2 connection as the yardsticks use it: autocommit, and
    runjobs' session settings."""
    conn = psycopg2.connect(libpq_url(db.url), options=PG_OPTIONS)
    conn.autocommit = True
    return conn


# -- drain ----------------------------------------------------------------------------

def _claim_until_empty(db: Db, batch: int, errors: list) -> None:
    """One plain worker: claim up to `batch` jobs in one statement, mark them
    SUCCESS in a second, until nothing unlocked is PENDING (the others hold
    the rest). Two round trips per claim, each committing by itself."""
    try:
        conn = pg_connect(db)
        claim = CLAIM.format(batch=int(batch))
        with conn.cursor() as cursor:
            while True:
                cursor.execute(claim)
                ids = [row[0] for row in cursor.fetchall()]
                if not ids:
                    break
                cursor.execute(FINISH, (ids,))
        conn.close()
    except Exception as exc:  # reported by plain_drain
        errors.append(exc)


def plain_drain(db: Db, jobs: int, batch: int) -> dict[str, float]:
    """`jobs` noops queued as for the engine's drain (dbs.queue_noops), then
    drained by 8 threads claiming `batch` jobs per round trip (PostgreSQL).

    `per_s` is timed as the engine's drain is (workloads.drain): from the
    first claim to the last finish, by the database's own timestamps, so
    neither side counts its start-up (threads and connections here, the
    runner process there)."""
    before = queue_noops(db, jobs)
    errors: list = []
    threads = [threading.Thread(target=_claim_until_empty, args=(db, batch, errors))
               for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=JOIN_TIMEOUT)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"plain drain: {errors or 'threads still running'}")
    done, first_start, last_finish = finished_window(db, before)
    if done != jobs:
        raise RuntimeError(f"plain drain: {done} of {jobs} jobs SUCCESS")
    return {"per_s": jobs / (last_finish - first_start)}


# -- submit ---------------------------------------------------------------------------

class PlainInserts:
    """Single-row INSERTs of a PENDING job, each committing by itself, from
    one connection kept open: what a submit costs with no engine around it.

    Like the engine's single submit (runjobs/store/submit.py, SubmitQueries._submit_one):
    on PostgreSQL one statement in autocommit, one round trip, its insert
    trigger sending the NOTIFY; on SQLite one INSERT in sqlite3's autocommit
    mode, the statement taking the write lock itself, its id the cursor's
    lastrowid."""

    def __init__(self, db: Db) -> None:
        if db.is_postgres:
            self.conn = pg_connect(db)
            self.sql = ("INSERT INTO jobs (action, params, status, run_at, created_at, "
                        "updated_at) VALUES ('noop', '{}', 'PENDING', now(), now(), now()) "
                        "RETURNING id")
        else:
            # The same pragmas as runjobs' own connections (runjobs/store/dialect.py).
            self.conn = sqlite3.connect(sqlite_path(db.url), isolation_level=None)
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
                self.conn.execute(f"PRAGMA {pragma}")
            now = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
            self.sql = ("INSERT INTO jobs (action, params, status, run_at, created_at, "
                        f"updated_at) VALUES ('noop', '{{}}', 'PENDING', {now}, {now}, {now})")
        self.is_postgres = db.is_postgres

    def seconds(self, count: int) -> float:
        """The time `count` inserts took (each also reads its new id)."""
        cursor = self.conn.cursor()
        start = time.perf_counter()
        for _ in range(count):
            cursor.execute(self.sql)
            _ = cursor.fetchone() if self.is_postgres else cursor.lastrowid
        return time.perf_counter() - start

    def close(self) -> None:
        self.conn.close()
