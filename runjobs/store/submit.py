"""Submitting jobs: one INSERT that commits by itself for a single job, one
transaction for a batch; an open job's key returns that job (idempotent
submit, ux_jobs_key_open)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
from typing import Any, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from ..errors import StoreError
from ..models import JobSpec, Status
from ..schema import NOT_FINAL_STATUSES, UtcDateTime, jobs
from .connections import Connections
from .driver import describe
from .shared import status_is

# The columns a submit's row fills (`_row_of`); created_at, updated_at and
# run_at come from the insert statement itself.
ROW_COLUMNS = ("action", "params", "status", "priority", "max_start_at", "timeout",
               "retries", "needs", "key", "rerun_of")


@dataclasses.dataclass(frozen=True)
class Submitted:
    id: int
    created: bool            # False: an open job with the same key was returned
    params_differ: bool = False


class SubmitQueries(Connections):
    """New jobs."""

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
            raise StoreError(describe(exc)) from exc
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
            status_is(jobs.c.status, NOT_FINAL_STATUSES))
        return {key: (job_id, params) for key, job_id, params in conn.execute(query)}

    @staticmethod
    def _row_of(spec: JobSpec, now: dt.datetime | None) -> dict[str, Any]:
        """The row to insert: the columns of `ROW_COLUMNS`, and `b_run_at`."""
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
        now = self.dialect.clock
        return sa.insert(jobs).values(
            created_at=now, updated_at=now,
            run_at=sa.func.coalesce(sa.bindparam("b_run_at", type_=UtcDateTime), now))

    @functools.cached_property
    def _insert_sql(self) -> sa.Insert:
        return self._insert_rows_sql.returning(jobs.c.id, sort_by_parameter_order=True)

    def _insert_one(self, conn: sa.Connection, row: dict[str, Any]) -> int:
        """One job inserted on the driver's cursor (SQLAlchemy's execution
        cost more than the insert); its id. Where the cursor's lastrowid is
        the id (SQLite), the insert has no RETURNING: it cost the insert 1.4
        of ~17 us."""
        if self.dialect.insert_returns_ids:
            (job_id,), = self._driver_run(conn, self._insert_sql, ROW_COLUMNS, **row)
        else:
            (job_id,), = self._driver_run(conn, self._insert_rows_sql, ROW_COLUMNS,
                                          row_id=True, **row)
        return job_id

    def _insert(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> list[int]:
        if len(rows) == 1:
            return [self._insert_one(conn, rows[0])]
        clock = self.dialect.clock_params({})  # one 'now' for the batch
        rows = [dict(row, **clock) for row in rows]
        return list(conn.execute(self._insert_sql, rows).scalars())

    # -- claim, start, finish ---------------------------------------------------
