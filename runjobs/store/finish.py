"""A runner's outcomes: final statuses, and retries put back to PENDING.

Every write is a compare-and-set on the runner's own RUNNING (or
TO_CANCEL) job, so a finish never overwrites a cancel or a rescue.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import sqlalchemy as sa

from ..models import Job, Outcome, Status
from ..schema import jobs
from .connections import Connections
from .shared import RUNNING, TO_CANCEL, status_is

PLAIN_OUTCOMES = {status: Outcome(status) for status in Status}  # only a status


@dataclasses.dataclass(frozen=True)
class Finish:
    """Jobs with one outcome, left for the claim's statement to write."""

    ids: list[int]
    outcome: Outcome


class FinishQueries(Connections):
    """Outcomes, written in the round's transaction or on their own."""

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
                   keep_largest: bool = False) -> tuple[list[int], "Finish | None"]:
        """Write the outcomes; jobs with the same plain outcome share one
        statement. With `keep_largest`, the largest such group is not
        written but returned, for the claim's statement to write."""
        written: list[int] = []
        groups: dict[Status, list[int]] = {}
        for job, outcome, retry_in in results:
            if retry_in is not None:
                written += self._retry(conn, runner_id, job, outcome, retry_in)
            elif outcome == PLAIN_OUTCOMES[outcome.status]:  # a plain outcome: batch it
                groups.setdefault(outcome.status, []).append(job.id)
            else:
                written += self._final(conn, runner_id, [job.id], outcome)
        kept = None
        if keep_largest and groups:
            kept = max(groups, key=lambda status: len(groups[status]))
        for status, ids in groups.items():
            if status is not kept:
                written += self._final(conn, runner_id, ids, Outcome(status))
        return written, (Finish(groups[kept], Outcome(kept)) if kept else None)

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
        now = self.dialect.clock
        canceling = status_is(jobs.c.status, TO_CANCEL)
        status = sa.case((sa.and_(canceling, sa.bindparam("cancel_wins", type_=sa.Boolean)),
                          Status.CANCELED.value), else_=sa.bindparam("b_status"))
        # A job that ended in its runner did not take the runner down: its
        # count of crashes in a row starts again.
        return (
            sa.update(jobs)
            .where(self.dialect.id_in_ids(jobs.c.id), jobs.c.runner_id == sa.bindparam("runner"),
                   status_is(jobs.c.status, RUNNING))
            .values(status=status, finished_at=now, updated_at=now, crashes=0,
                    pgid=None, pgid_runner=None,
                    output=sa.bindparam("b_output"), error=sa.bindparam("b_error"),
                    peak_rss_kb=sa.func.coalesce(sa.bindparam("b_peak_rss_kb", type_=sa.BigInteger),
                                                 jobs.c.peak_rss_kb))
            .returning(jobs.c.id))

    def _retry(self, conn: sa.Connection, runner_id: int, job: Job, outcome: Outcome,
               retry_in: float) -> list[int]:
        result = conn.execute(
            sa.update(jobs)
            .where(jobs.c.id == job.id, jobs.c.runner_id == runner_id,
                   jobs.c.status == Status.RUNNING.value)
            .values(status=Status.PENDING.value, run_at=self.dialect.now_plus(retry_in),
                    runner_id=None, node=None, queued_at=None, output=outcome.output,
                    error=outcome.error, crashes=0, pgid=None, pgid_runner=None,
                    updated_at=self.dialect.now())
            .returning(jobs.c.id)
        )
        ids = list(result.scalars())
        if not ids:  # canceled meanwhile: never retried
            return self._final(conn, runner_id, [job.id], Outcome(Status.CANCELED, error=outcome.error))
        return ids
