"""PostgreSQL's round in one statement, for the common case.

The greedy fit of `capacity.fitting` is decided in SQL for jobs with the
default needs on a node whose running jobs all have them: such jobs fit
while default slots are free, so the due ones are taken in order up to the
first job with other needs. Whatever SQL cannot decide is left to the fit in
Python (`claim.ClaimQueries._choose`), in the same transaction.

The statement also writes the round's largest group of plain outcomes
(`finish`), a round trip less per round.
"""

from __future__ import annotations

from typing import Any, Mapping, TYPE_CHECKING

import sqlalchemy as sa

from ..models import Job
from ..schema import jobs
from .connections import Connections
from .shared import ORDER, STARTED, active, default_needs

if TYPE_CHECKING:
    from .finish import Finish


class PlainRound(Connections):
    """Mixed into the claim queries, whose conditions it uses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_claims: dict[tuple[bool, int, int], sa.Update] = {}

    def _plain_claim(self, conn: sa.Connection, runner_id: int, node: str,
                     capacity: Mapping[str, int], limit: int | None,
                     finish: "Finish | None") -> tuple[list[Job], bool]:
        """Write `finish` and claim and start jobs with the
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
            sa.func.coalesce(sa.func.bool_and(default_needs(active.c.needs)), True).label("plain"),
        ).where(*self._node_jobs(finished_ids)).cte("in_use").prefix_with("MATERIALIZED")  # once
        candidates = (
            sa.select(jobs.c.id, jobs.c.needs, jobs.c.priority, jobs.c.run_at)
            .where(*self._due())
            .order_by(*ORDER).limit(most_sql)
            .with_for_update(skip_locked=True, of=jobs)
            .cte("candidates"))
        c = candidates.c
        ranked = sa.select(
            c.id, default_needs(c.needs).label("plain"),
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
                .returning(*STARTED, chosen.c.place, chosen.c.jobs.label("in_use")))
