"""Statuses and the plain values passed between the store, runner and CLI."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from typing import Any


class Status(str, enum.Enum):
    HELD = "HELD"
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    TO_CANCEL = "TO_CANCEL"
    CANCELED = "CANCELED"
    SUCCESS = "SUCCESS"
    WARNING = "WARNING"
    FAILURE = "FAILURE"
    EXPIRED = "EXPIRED"
    ABANDONED = "ABANDONED"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self in FINAL


class RunnerState(str, enum.Enum):
    """A runner's row: claiming until its deadline, then draining (its jobs
    finish), then exited; drained when it started on a drained node and
    claims nothing; dead when another runner found it gone and rescued its
    jobs. Claiming and draining runners may still be found dead."""

    CLAIMING = "claiming"
    DRAINING = "draining"
    DRAINED = "drained"
    EXITED = "exited"
    DEAD = "dead"

    def __str__(self) -> str:
        return self.value


# The states of a runner that may still hold jobs: what rescue looks at.
LIVE_RUNNER_STATES = (RunnerState.CLAIMING.value, RunnerState.DRAINING.value)


FINAL = frozenset(
    {Status.CANCELED, Status.SUCCESS, Status.WARNING, Status.FAILURE,
     Status.EXPIRED, Status.ABANDONED}
)
# Statuses that hold a share of a node's capacity.
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.TO_CANCEL})
# Statuses under which a `--key` still names the job (idempotent submit).
NOT_FINAL = frozenset(set(Status) - FINAL)

# `submit --wait` exit codes, fixed by the contract.
WAIT_EXIT_CODES = {
    Status.SUCCESS: 0, Status.WARNING: 3, Status.FAILURE: 4,
    Status.CANCELED: 5, Status.EXPIRED: 6, Status.ABANDONED: 7,
}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a submit asks for; validated before anything is written."""

    action: str
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    priority: int = 0
    run_at: dt.datetime | None = None       # None: now (the database's clock)
    run_in: float | None = None             # seconds from the database's now
    max_start_at: dt.datetime | None = None
    timeout: float | None = None            # seconds; None: action/global default
    retries: int | None = None              # None: the action's default
    needs: dict[str, int] | None = None     # None: {"default": 1}
    key: str | None = None
    hold: bool = False
    rerun_of: int | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One row of the jobs table, as the store returns it."""

    id: int
    action: str
    params: dict[str, Any]
    status: Status
    priority: int
    attempt: int
    retries: int
    timeout: float | None
    needs: dict[str, int]
    # The rest is None where the store did not read it (a job a runner just
    # started carries only what running it needs).
    run_at: dt.datetime | None = None
    max_start_at: dt.datetime | None = None
    key: str | None = None
    rerun_of: int | None = None
    runner_id: int | None = None
    node: str | None = None
    progress_done: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    output: str | None = None
    error: str | None = None
    peak_rss_kb: int | None = None
    created_at: dt.datetime | None = None
    queued_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What executing a job produced; the store persists it afterwards.

    `retry` is False when the failure must not be retried (DoNotRetry, a
    final exit code, an action that is not registered).
    """

    status: Status
    output: str | None = None
    error: str | None = None
    retry: bool = True
    peak_rss_kb: int | None = None
    # Write the status as is, even over TO_CANCEL (which otherwise turns a
    # FAILURE into CANCELED): for a job that could not be stopped.
    keep_status: bool = False


@dataclasses.dataclass(frozen=True)
class Event:
    """One line of a job's timeline."""

    at: dt.datetime
    status: Status
    previous: Status | None
    runner_id: int | None
    attempt: int
    note: str | None
