"""Runners: their rows (register, heartbeat, state), and the rescue of a
dead runner's jobs in one transaction. Whether a runner is dead is decided
in runjobs.rescue; this module writes what follows from it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Sequence

import sqlalchemy as sa

from ..models import LIVE_RUNNER_STATES, RunnerState, Status
from ..schema import ACTIVE_STATUSES, jobs, runners
from .connections import Connections
from .shared import RUNNING, held_by, status_is


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



DEAD = RunnerState.DEAD.value


class RunnerQueries(Connections):
    """Runner rows, and the rescue of a dead runner's jobs."""

    def runner_register(self, node: str, pid: int, boot_id: str | None,
                        deadline: dt.datetime | None, version: str) -> int:
        with self._tx() as conn:
            now = self.dialect.now()
            return conn.execute(
                sa.insert(runners)
                .values(node=node, pid=pid, boot_id=boot_id, state=RunnerState.CLAIMING.value,
                        started_at=now, heartbeat_at=now, deadline=deadline, version=version)
                .returning(runners.c.id)
            ).scalar_one()

    def runner_heartbeat(self, runner_id: int) -> bool:
        """Record that the runner lives. False if it was declared dead (its
        jobs rescued): nothing is written then, and the runner must stop."""
        with self._tx() as conn:
            return conn.execute(
                sa.update(runners).where(runners.c.id == runner_id, runners.c.state != DEAD)
                .values(heartbeat_at=self.dialect.now())).rowcount == 1

    def runner_set_state(self, runner_id: int, state: RunnerState) -> None:
        with self._tx() as conn:
            now = self.dialect.now()
            values: dict[str, Any] = {"state": RunnerState(state).value, "heartbeat_at": now}
            if state == RunnerState.EXITED:
                values["exited_at"] = now
            # A runner declared dead stays dead: its jobs are someone else's.
            conn.execute(sa.update(runners).where(runners.c.id == runner_id,
                                                  runners.c.state != DEAD).values(**values))

    def runners_list(self, limit: int = 100) -> list[RunnerRow]:
        with self._read_tx() as conn:
            now = self.db_now(conn)
            rows = conn.execute(
                sa.select(runners).order_by(runners.c.id.desc()).limit(limit)).all()
            active = conn.execute(
                sa.select(jobs.c.runner_id, jobs.c.id)
                .where(status_is(jobs.c.status, ACTIVE_STATUSES),
                       jobs.c.runner_id.in_([r.id for r in rows]))
                .order_by(jobs.c.id)).all()
        running: dict[int, list[int]] = {}
        for runner_id, job_id in active:
            running.setdefault(runner_id, []).append(job_id)
        return [RunnerRow(**r._asdict(),
                          heartbeat_age=(now - r.heartbeat_at).total_seconds(),
                          running=tuple(running.get(r.id, ()))) for r in rows]

    # -- rescue of dead runners -------------------------------------------------

    def runners_alive(self) -> list[RunnerRow]:
        """Runners not known to have ended (claiming or draining), with
        their heartbeat age on the database's clock."""
        with self._read_tx() as conn:
            now = self.db_now(conn)
            rows = conn.execute(
                sa.select(runners).where(runners.c.state.in_(LIVE_RUNNER_STATES))
                .order_by(runners.c.id)).all()
        return [RunnerRow(**r._asdict(), heartbeat_age=(now - r.heartbeat_at).total_seconds(),
                          running=()) for r in rows]

    def node_boot_ids(self, node: str) -> str | None:
        """The boot id of the newest runner of `node`: its host's current boot."""
        with self._read_tx() as conn:
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
            now = self.dialect.now()
            where = [runners.c.id == runner_id, runners.c.state.in_(LIVE_RUNNER_STATES)]
            if stale_after is not None:
                where.append(runners.c.heartbeat_at < self.dialect.now_plus(-stale_after))
            claimed = conn.execute(
                sa.update(runners).where(*where)
                .values(state=DEAD, exited_at=now).returning(runners.c.id)).first()
            if claimed is None:
                return None
            mine = held_by(runner_id)
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
                run_at = sa.case((its_group, self.dialect.now_plus(hold_groups)), else_=now)
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
                sa.update(jobs).where(jobs.c.id == job_id, held_by(runner_id),
                                      status_is(jobs.c.status, RUNNING))
                .values(pgid=pgid, pgid_runner=runner_id)).rowcount == 1

    def process_groups_of_dead(self, node: str) -> list[tuple[int, int, int, str | None]]:
        """(job id, pgid, runner id, the runner's boot id) of the process
        groups that runners of `node` declared dead had recorded and that no
        one has cleared yet (ix_jobs_process_group holds only these rows and
        the running commands')."""
        with self._read_tx() as conn:
            return [tuple(row) for row in conn.execute(
                sa.select(jobs.c.id, jobs.c.pgid, jobs.c.pgid_runner, runners.c.boot_id)
                .join(runners, runners.c.id == jobs.c.pgid_runner)
                .where(jobs.c.pgid.is_not(None), runners.c.node == node,
                       runners.c.state == DEAD)
                .order_by(jobs.c.id))]

    def process_group_cleared(self, job_id: int, runner_id: int) -> bool:
        """The group `runner_id` recorded for the job is gone: forget it, and
        a retry held for it (`runner_rescue`'s `hold_groups`) is due now.
        False if the job has recorded another group since."""
        with self._tx() as conn:
            now = self.dialect.now()
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
            now = self.dialect.now()
            mine = sa.and_(held_by(runner_id), jobs.c.id.not_in(list(running_ids)))
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
            .values(updated_at=self.dialect.now(), **values).returning(jobs.c.id)).scalars())

