"""The minute cycle: claim due jobs, run each in a thread, exit before the next
minute.

`Runner.tick(now)` does one round (reap finished jobs, deliver stops, the
duties that are due, record outcomes and claim in one transaction, start
what was claimed) and returns what happened; `Runner.run()` only loops,
waits and stops. Both read time from an injectable `Clock`, so a test can
drive `tick()` by hand. The jobs' threads live in `jobthreads`, the
periodic duties in `duties`, the heartbeat and its lease in `lease`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import os
import queue
import random
import signal
import time
from typing import Callable

from . import __version__
from .actions import Action, Registry
from .capacity import usage
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .duties import Reconcile, runner_duties
from .errors import StoreError
from .executor import signal_group
from .jobthreads import JobThreads, RunningJob
from .lease import Heartbeat, Lease
from .models import Job, Outcome, RunnerState, Status
from .store import Store

log = logging.getLogger("runjobs.runner")

MAX_BACKOFF = 3600.0
GATHER = 0.001       # seconds a round waits for more jobs to end once one has
POLL_SLACK = 0.02    # seconds (at most a 20th of poll_interval) an idle round comes early
DISOWNED_WAIT = 1.0  # seconds a runner declared dead waits for its stopped jobs to end

Result = tuple[Job, Outcome, "float | None"]   # a job, its outcome, seconds to its retry


def cycle_deadline(now: float, period: float, margin: float) -> float:
    """The next multiple of `period` minus `margin`; a cycle started inside
    the margin targets the boundary after."""
    boundary = (now // period + 1) * period
    deadline = boundary - margin
    if now >= deadline:
        deadline += period
    return deadline


def retry_delay(attempt: int, base: float, rand: Callable[[], float] = random.random) -> float:
    """`base` doubled per attempt, +-25 % jitter, capped at an hour."""
    delay = min(base * 2 ** max(0, attempt - 1), MAX_BACKOFF)
    return min(delay * (0.75 + 0.5 * rand()), MAX_BACKOFF)


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class TickResult:
    finished: int = 0
    started: int = 0                   # claimed and started: one transaction does both
    full: bool = False                 # claimed every slot it had: more may be due


class Runner:
    """One runner process's jobs. Not thread-safe: one thread calls tick()."""

    def __init__(self, settings: Settings, store: Store, registry: Registry,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.clock = clock
        self.runner_id: int | None = None
        self.boot_id = boot_id()
        self.claiming = True
        self.stop_requested = False
        self._shutdown_at: float | None = None    # monotonic time of SIGTERM
        self.abandoned = 0                         # threads given up as unstoppable
        # What wakes the loop: a job's outcome from its thread, or None for
        # a NOTIFY or a stop request. One queue, not a queue and an Event:
        # an Event.set per job cost a drain of short jobs a tenth of its time.
        self._inbox: queue.SimpleQueue[tuple[int, Outcome] | None] = queue.SimpleQueue()
        self._arrived: list[tuple[int, Outcome]] = []  # taken by a wait, not reaped yet
        self._unreported: list[Result] = []
        self.threads = JobThreads(settings, clock, self._inbox, self._report_progress)
        self.cancel_check, *self._other_duties = runner_duties(
            settings.poll_interval, settings.heartbeat_interval)
        self._reconcile = Reconcile()
        self._db_error: str | None = None          # set while the database fails
        self.ended: collections.Counter[str] = collections.Counter()  # outcomes, for the exit line
        # Declared dead by another runner (found at a heartbeat or a check):
        # every job is stopped at once, nothing more is written.
        self.disowned = False
        self.discarded: collections.Counter[str] = collections.Counter()
        self.lease = Lease(settings.heartbeat_timeout, settings.heartbeat_interval, clock)

    @property
    def running(self) -> dict[int, RunningJob]:
        return self.threads.running

    def register(self, deadline: float | None) -> int:
        when = dt.datetime.fromtimestamp(deadline, dt.timezone.utc) if deadline else None
        begun = self.clock.monotonic()
        self.runner_id = self.store.runner_register(
            self.settings.node, os.getpid(), self.boot_id, when, __version__)
        self.lease.beat_recorded(begun)
        log.info("runner %s started on %s (pid %s)", self.runner_id, self.settings.node, os.getpid())
        return self.runner_id

    # -- one round -------------------------------------------------------------

    def tick(self, now: float | None = None) -> TickResult:
        """One round at monotonic time `now` (the clock's, if None)."""
        now = self.clock.monotonic() if now is None else now
        if not self._still_ours(now):
            self._reap_disowned(now)
            return TickResult()
        finished = self._reap()
        for entry in self.threads.stop_overdue(now, self._shutdown_at):
            self._give_up(entry)
        slots = self._own_free_slots()
        started: list[Job] = []
        batch = self._unreported + finished
        try:
            asked = self.cancel_check.run_if_due(self, now)
            for duty in self._other_duties:
                asked = duty.run_if_due(self, now) or asked
            claim = self.claiming and slots > 0
            if batch or claim:
                # Outcomes, claim and start in one transaction.
                started = self.store.runner_round(self.runner_id, self.settings.node,
                                                  self.settings.capacity, batch, claim, slots)
                self._unreported = []
                self._count(batch)
                asked = True
            if asked:  # only an answer says the database is back, not a round without a query
                self._database_ok()
        except StoreError as exc:
            # Keep the running jobs and their outcomes; claim nothing until
            # the database is back.
            self._unreported = batch
            self.database_failed(exc)
        for job in started:
            self._launch(job, self.registry.get(job.action))
        self._reconcile.run_if_due(self)
        return TickResult(len(finished), len(started),
                          full=bool(started) and len(started) >= slots)

    def database_failed(self, exc: StoreError) -> None:
        if self._db_error is None:  # one line per change of state, not per query
            log.error("runner %s: database unavailable, not claiming until it is back: %s",
                      self.runner_id, exc)
        self._db_error = str(exc)

    def _database_ok(self) -> None:
        if self._db_error is not None:
            log.info("runner %s: database available again", self.runner_id)
            self._reconcile.due = True
        self._db_error = None

    def _own_free_slots(self) -> int:
        """Free slots counting only this process's jobs: when even these fill
        the node, there is no point asking the database."""
        used = usage(r.job.needs for r in self.running.values())
        return sum(max(0, n - used.get(k, 0)) for k, n in self.settings.capacity.items())

    def _launch(self, job: Job, action: Action | None) -> None:
        self.threads.launch(job, action, self.runner_id, self._group_started)

    def _group_started(self, job_id: int, pgid: int) -> bool:
        """In a worker thread: the job's process group exists; record it for
        a rescuer on this node. False if the job is not this runner's any
        more: the caller kills the group at once."""
        entry = self.running.get(job_id)
        if entry is not None:
            entry.pgid = pgid
        if self.disowned:
            return False
        try:
            if self.store.job_process_group(job_id, self.runner_id, pgid):
                return True
        except StoreError as exc:
            # Unrecorded, the group is ended by the parent-death signal
            # alone if this runner dies; the job runs on as before.
            log.warning("job %s: its process group %s not recorded: %s", job_id, pgid, exc)
            return True
        self.lease.end()  # rescued under us: the loop asks at once
        self._inbox.put(None)
        return False

    # -- outcomes ---------------------------------------------------------------------

    def _reap(self) -> list[Result]:
        """Outcomes of the jobs that ended since the last round (no I/O)."""
        results = []
        for job_id, outcome in self._ended():
            entry = self.running.pop(job_id, None)
            if entry is None:  # given up as unstoppable; its outcome came too late
                log.warning("job %s: its abandoned thread ended after all", job_id)
                continue
            results.append((entry.job, outcome, self._retry_in(entry.job, outcome)))
            # A line per SUCCESS costs a fast drain a sixth of its time:
            # those only at debug level; the exit line counts them.
            level = logging.DEBUG if outcome.status is Status.SUCCESS else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "job %s (%s) ended %s%s", job_id, entry.job.action,
                        outcome.status.value, f": {outcome.error}" if outcome.error else "")
        return results

    def _ended(self) -> list[tuple[int, Outcome]]:
        """The outcomes in the inbox, without waiting; wake-ups dropped."""
        ended, self._arrived = self._arrived, []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return ended
            if item is not None:
                ended.append(item)

    def _retry_in(self, job: Job, outcome: Outcome) -> float | None:
        if outcome.status is Status.FAILURE and outcome.retry and job.attempt <= job.retries:
            return retry_delay(job.attempt, self.settings.retry_backoff)
        return None

    def _count(self, batch: list[Result]) -> None:
        """Outcomes recorded, for the exit line: counted once written, so the
        line never claims what the database does not hold."""
        for _job, outcome, _retry in batch:
            self.ended[outcome.status.value] += 1

    def _report(self, results: list[Result]) -> None:
        batch = self._unreported + results
        if not batch or self.disowned:
            return
        try:
            self.store.jobs_finish(self.runner_id, batch)
            self._unreported = []
            self._count(batch)
        except StoreError as exc:
            if not self._unreported:
                log.error("runner %s: cannot record %d outcome(s), will retry: %s",
                          self.runner_id, len(batch), exc)
            self._unreported = batch

    def _give_up(self, entry: RunningJob) -> None:
        outcome = self.threads.give_up(entry)
        if outcome is not None:
            self.abandoned += 1
            self._report([(entry.job, outcome, None)])

    def _report_progress(self, job_id: int, done, total, message) -> None:
        try:
            self.store.job_progress(job_id, done, total, message)
        except StoreError as exc:
            log.warning("job %s: progress not recorded: %s", job_id, exc)

    # -- declared dead ------------------------------------------------------------------

    def declared_dead(self) -> None:
        """From the heartbeat thread: the runner's row says dead."""
        self._inbox.put(None)

    def _still_ours(self, now: float) -> bool:
        """Whether this runner's jobs are still its own: not declared dead by
        another runner. The database is asked only once the lease ran out."""
        if self.disowned:
            return False
        if self.lease.dead_heard.is_set():
            self._disown("found at its heartbeat")
            return False
        if self.runner_id is None or self.lease.held(now):
            return True
        begun = self.clock.monotonic()
        try:
            alive = self.store.runner_heartbeat(self.runner_id)
        except StoreError as exc:
            # Nothing can be written meanwhile either; asked again next round.
            self.database_failed(exc)
            return True
        if not alive:
            self._disown(f"found after {self.lease.overdue_by(self.clock.monotonic()):.1f}s "
                         "without a heartbeat")
            return False
        self.lease.beat_recorded(begun)
        return True

    def _disown(self, how: str) -> None:
        """Another runner declared this one dead and rescued its jobs: they
        are someone else's now. Stop each at once (a command's group gets
        SIGKILL, no grace), write nothing more, and leave."""
        self.disowned = True
        self.claiming = False
        log.error("runner %s was declared dead by another runner (%s; heartbeat_timeout %gs) "
                  "and its jobs were rescued: it stops its %d running job(s) at once, "
                  "discards their results and exits", self.runner_id, how,
                  self.settings.heartbeat_timeout, len(self.running))
        for job, outcome, _retry in self._unreported:
            self._discard(job.id, outcome)
        self._unreported = []
        for entry in list(self.running.values()):
            if entry.pgid is not None:
                signal_group(entry.pgid, signal.SIGKILL)
            self.threads.stop(entry, "stopped: its runner was declared dead")

    def _reap_disowned(self, now: float) -> None:
        """Discard what ended; give up on jobs that ignore their stop for a
        moment (their threads die with the process)."""
        for job_id, outcome in self._ended():
            entry = self.running.pop(job_id, None)
            if entry is not None:
                entry.context.close_log()
            self._discard(job_id, outcome)
        for entry in list(self.running.values()):
            if entry.stop_at is not None and now - entry.stop_at > DISOWNED_WAIT:
                self.running.pop(entry.job.id)
                self.abandoned += 1
                log.error("job %s: does not stop; left to die with its runner", entry.job.id)

    def _discard(self, job_id: int, outcome: Outcome) -> None:
        self.discarded[outcome.status.value] += 1
        log.warning("job %s: its result %s discarded, not recorded: runner %s was declared "
                    "dead and the job rescued by another runner, whose record stands",
                    job_id, outcome.status.value, self.runner_id)

    # -- the loop ------------------------------------------------------------------------

    def stop_claiming(self) -> None:
        """At the deadline (or on SIGTERM): claim nothing more and put back
        what was claimed but not started."""
        if not self.claiming:
            return
        self.claiming = False
        try:
            self.store.jobs_unclaim(self.runner_id)
            self.store.runner_set_state(self.runner_id, RunnerState.DRAINING)
        except StoreError as exc:
            # What stays QUEUED under this runner is rescued once it is gone.
            self.database_failed(exc)
        log.info("runner %s stops claiming; %d job(s) still running",
                 self.runner_id, len(self.running))

    def run(self, deadline: float | None, once: bool = False,
            on_stop_claiming: Callable[[], None] | None = None) -> None:
        """Loop until the deadline (wall clock; None with `once`: until
        nothing is left), then drain the jobs still running."""
        if self.runner_id is None:
            self.register(deadline)
        heartbeat = Heartbeat(self.store, self.runner_id, self.settings.heartbeat_interval,
                              self.lease, self.declared_dead)
        heartbeat.start()
        listener = self.store.listen(self._on_notify)
        try:
            self._loop(deadline, once, on_stop_claiming)
        finally:
            heartbeat.stop()
            if listener is not None:
                listener.stop()
            self._finish()

    def _on_notify(self, what: str) -> None:
        """From the listener thread: a job was submitted or a cancel asked."""
        if what == "cancel":
            self.cancel_check.hurry()
        self._inbox.put(None)

    def _loop(self, deadline: float | None, once: bool,
              on_stop_claiming: Callable[[], None] | None) -> None:
        while True:
            if self.claiming and (self.stop_requested
                                  or (deadline and self.clock.wall() >= deadline)):
                self.stop_claiming()
                if on_stop_claiming:
                    on_stop_claiming()
            # A job that ends during the round stays in the inbox, so the
            # wait below returns at once.
            round_at = self.clock.monotonic()
            try:
                result = self.tick(round_at)
            except Exception:  # a bug of ours: log it, keep the running jobs going
                log.exception("runner %s: unexpected error in its loop", self.runner_id)
                result = TickResult()
            if not self.claiming and not self.running:
                return
            if once and self.claiming and not result.started and not self.running:
                if self._nothing_active():
                    self.stop_claiming()
                    continue
            if not result.full:  # full: more may be due, claim again at once
                self._wait(self._wait_time(deadline, round_at))
            self._gather_endings()

    def _wait(self, timeout: float) -> None:
        """Until something is in the inbox (a job ended, a NOTIFY, a stop)
        or `timeout` seconds; an outcome taken stays for the next reap."""
        if self._arrived:
            return
        try:
            item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        if item is not None:
            self._arrived.append(item)

    def _gather_endings(self) -> None:
        """Once a job has ended, give the others a moment (GATHER) to end
        too: a round costs about the same for one outcome as for eight, so
        short jobs are recorded, and their slots refilled, in batches."""
        if not self._arrived and self._inbox.empty():
            return
        until = self.clock.monotonic() + GATHER
        while (len(self._arrived) + self._inbox.qsize() < len(self.running)
               and self.clock.monotonic() < until):
            time.sleep(GATHER / 10)

    def _nothing_active(self) -> bool:
        try:
            return self.store.jobs_count_active(self.settings.node) == 0
        except StoreError as exc:  # not known: keep going, as tick() does
            self.database_failed(exc)
            return False

    def _wait_time(self, deadline: float | None, round_at: float) -> float:
        """Until the next round: poll_interval from the start of the last
        one (monotonic `round_at`), so a job due just after a round waits at
        most poll_interval, not that plus the round; sooner while jobs run
        and at the deadline. A little sooner still (POLL_SLACK): the work a
        round does before its claim (a few ms, more when it expires jobs or
        looks for dead runners) varies, and must not push a job's wait past
        the interval."""
        interval = self.settings.poll_interval
        wait = interval - min(POLL_SLACK, interval / 20) - (self.clock.monotonic() - round_at)
        if self.running:
            wait = min(wait, 0.5)  # timeouts and cancels are checked each round
        if self.claiming and deadline:
            wait = min(wait, deadline - self.clock.wall())
        return max(0.0, wait)

    def _finish(self) -> None:
        if self.disowned:
            log.error("runner %s exits, declared dead; nothing recorded since; results "
                      "discarded: %s; jobs ended before: %s", self.runner_id,
                      _counted(self.discarded), _counted(self.ended))
            return
        self.stop_claiming()
        self._report([])
        if self._unreported:
            # Leave the runner row as it is: once its heartbeat is old, any
            # runner rescues the jobs whose outcome could not be written.
            log.error("runner %s exits with %d outcome(s) not recorded; they will be rescued",
                      self.runner_id, len(self._unreported))
            return
        try:
            self.store.runner_set_state(self.runner_id, RunnerState.EXITED)
        except StoreError as exc:
            log.error("runner %s: could not record its exit: %s", self.runner_id, exc)
        log.info("runner %s exited; jobs ended: %s", self.runner_id, _counted(self.ended))

    def request_stop(self, *_args) -> None:
        """Signal handler: only set flags; the loop does the work. Running
        jobs get `grace_period` to end; a second signal stops them at once."""
        now = self.clock.monotonic()
        if self.stop_requested:
            now -= self.settings.grace_period
        self._shutdown_at = now
        self.stop_requested = True
        self._inbox.put(None)  # SimpleQueue.put may be called from a signal handler


def _counted(counts: collections.Counter[str]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def install_signal_handlers(runner: Runner) -> None:
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
