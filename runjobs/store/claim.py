"""The runner's round: record the outcomes of jobs that ended, claim due
jobs that fit the node's free capacity, and start them, in one transaction
(`runner_round`). Claim order: priority (higher first), then run_at, then id.

Every claim is a compare-and-set on PENDING, and a runner declared dead
takes nothing new. Where plain jobs can be claimed in the round's first
statement (`plain_round`), that goes first; the fit in Python here decides
what it left.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import sqlalchemy as sa

from ..capacity import fitting, needs_of, usage
from ..models import Job, Outcome, RunnerState, Status
from ..schema import ACTIVE_STATUSES, jobs, runners
from .finish import FinishQueries
from .plain_round import PlainRound
from .shared import ORDER, PENDING, STARTED, active, held_by, status_is


class ClaimQueries(PlainRound, FinishQueries):
    """The round, as the runner calls it."""

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
        one_statement = claim and self.dialect.one_statement_round
        with self._round_tx() as conn:
            # Where plain jobs are claimed in one statement (PostgreSQL), that
            # statement also writes most of the outcomes: a round trip less.
            _, finish = self._finish_in(conn, runner_id, results, keep_largest=one_statement)
            if not claim:
                return []
            started: list[Job] = []
            if one_statement:
                started, decided = self._plain_claim(conn, runner_id, node, capacity, limit,
                                                     finish)
                if decided:
                    return started
                if limit is not None:
                    limit -= len(started)
            chosen = self._choose(conn, node, capacity, limit)
            if not chosen:
                return started
            rows = self._driver_run(conn, self._claim_start_sql, ids=chosen,
                                    runner=runner_id, node_name=node)
        by_id = {row[0]: self._started(row, runner_id, node) for row in rows}
        return started + [by_id[job_id] for job_id in chosen if job_id in by_id]

    def _choose(self, conn: sa.Connection, node: str, capacity: Mapping[str, int],
                limit: int | None) -> list[int]:
        """The ids of due jobs that fit the node's free capacity, best first
        (locked against other claimers)."""
        most = sum(max(0, n) for n in capacity.values())
        if limit is not None:
            most = min(most, limit)
        if most <= 0:
            return []
        # Look past a few jobs that need more than is free, so one big job
        # at the head of the queue does not stop small ones from starting.
        rows = self._driver_run(conn, self._candidates_sql, node_name=node, count=most + 16)
        used = usage(self.dialect.json_from_driver(rows[0][2]) or ()) if rows else {}
        free = {name: count - used.get(name, 0) for name, count in capacity.items()}
        decode = self.dialect.json_from_driver
        return fitting(((job_id, decode(needs)) for job_id, needs, _ in rows), free, most)

    def _started(self, row: tuple, runner_id: int, node: str) -> Job:
        """A job the runner just started, from its `STARTED` columns read
        on the driver's cursor."""
        job_id, action, params, priority, attempt, retries, timeout, needs = row[:8]
        return Job(id=job_id, action=action, params=self.dialect.json_from_driver(params) or {},
                   status=Status.RUNNING, priority=priority, attempt=attempt, retries=retries,
                   timeout=timeout, needs=needs_of(self.dialect.json_from_driver(needs)), runner_id=runner_id,
                   node=node)

    def _due(self) -> tuple[sa.ColumnElement, ...]:
        """Conditions of a job a runner may claim now."""
        now = self.dialect.clock
        return (status_is(jobs.c.status, PENDING), jobs.c.run_at <= now,
                sa.or_(jobs.c.max_start_at.is_(None), jobs.c.max_start_at > now))

    @staticmethod
    def _node_jobs(finished_ids: sa.Select | None = None) -> list[sa.ColumnElement]:
        """Conditions of the jobs holding the node's capacity (`active`):
        its QUEUED/RUNNING/TO_CANCEL jobs, a draining runner's included,
        less those the same statement finishes (`finished_ids`): it reads
        the snapshot from before its own writes."""
        where = [active.c.node == sa.bindparam("node_name"),
                 status_is(active.c.status, ACTIVE_STATUSES)]
        if finished_ids is not None:
            where.append(active.c.id.not_in(finished_ids))
        return where

    @functools.cached_property
    def _candidates_sql(self) -> sa.Select:
        """Due jobs, best first, locked where others could claim them too, and
        the needs of the node's jobs, in one round trip; the needs are empty
        when nothing is due."""
        node_needs = (sa.select(self.dialect.json_array(active.c.needs))
                      .where(*self._node_jobs()).scalar_subquery())
        query = (
            sa.select(jobs.c.id, jobs.c.needs, node_needs)
            .where(*self._due())
            .order_by(*ORDER)
            .limit(sa.bindparam("count"))
        )
        return self.dialect.lock_candidates(query, jobs)

    def _claim_update(self, chosen: sa.ColumnElement | None = None, **values: Any) -> sa.Update:
        """PENDING -> `values` for the chosen jobs: the `ids` parameter, or
        the rows `chosen` names. A runner declared dead (its jobs rescued)
        that comes back takes nothing new: no one would ever rescue jobs of
        a 'dead' runner."""
        alive = sa.exists().where(runners.c.id == sa.bindparam("runner"),
                                  runners.c.state != RunnerState.DEAD.value)
        now = self.dialect.clock
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
                    started_at=self.dialect.clock, error=None)

    @functools.cached_property
    def _claim_start_sql(self) -> sa.Update:
        """Claim and start in one statement: PENDING -> RUNNING. The event
        trigger still records the claim (QUEUED) before the start."""
        return self._claim_update(**self._start_values()).returning(*STARTED)

    def _cancel_unstarted(self, conn: sa.Connection, runner_id: int, ids: Sequence[int]) -> None:
        now = self.dialect.now()
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
            where = [held_by(runner_id), jobs.c.status == Status.QUEUED.value]
            if ids is not None:
                where.append(jobs.c.id.in_(ids))
            result = conn.execute(
                sa.update(jobs).where(*where)
                .values(status=Status.PENDING.value, runner_id=None, node=None,
                        queued_at=None, updated_at=self.dialect.now())
            )
            unstarted = sa.select(jobs.c.id).where(
                held_by(runner_id), jobs.c.status == Status.TO_CANCEL.value,
                jobs.c.started_at.is_(None))
            self._cancel_unstarted(conn, runner_id, list(conn.execute(unstarted).scalars()))
            return result.rowcount
