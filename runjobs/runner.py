"""The minute cycle: claim due jobs, run each in a thread, exit before the next
minute.

`Runner.tick()` does one round (reap finished jobs, deliver stops, claim,
start) and returns what happened; `Runner.run()` only loops, waits and stops.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import logging
import os
import queue
import random
import signal
import threading
import time
from typing import Callable

from . import __version__
from .actions import Action, JobCanceled, JobContext, JobLog, Registry
from .config import Settings
from .errors import StoreError
from .executor import execute, signal_group, stopped_outcome
from .models import Job, Outcome, Status
from .capacity import usage
from .store import Store

log = logging.getLogger("runjobs.runner")

MAX_BACKOFF = 3600.0
GATHER = 0.001       # seconds a round waits for more jobs to end once one has
POLL_SLACK = 0.02    # seconds (at most a 20th of poll_interval) an idle round comes early
DISOWNED_WAIT = 1.0  # seconds a runner declared dead waits for its stopped jobs to end


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


@dataclasses.dataclass
class RunningJob:
    job: Job
    action: Action
    context: JobContext
    started: float                     # monotonic
    ident: int | None = None           # the worker thread running it, once picked up
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    done: bool = False                 # the thread has its outcome; no more stops
    stop_sent: bool = False
    stop_at: float | None = None       # monotonic time the stop was sent
    pgid: int | None = None            # a command's process group, once recorded


@dataclasses.dataclass(frozen=True)
class TickResult:
    finished: int = 0
    started: int = 0                   # claimed and started: one transaction does both
    full: bool = False                 # claimed every slot it had: more may be due


class Runner:
    """One runner process's jobs. Not thread-safe: one thread calls tick()."""

    def __init__(self, settings: Settings, store: Store, registry: Registry,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.clock = clock
        self.runner_id: int | None = None
        self.running: dict[int, RunningJob] = {}
        self._workers = _Workers()
        self.claiming = True
        self.stop_requested = False
        self._shutdown_at: float | None = None    # monotonic time of SIGTERM
        self.abandoned = 0                         # threads given up as unstoppable
        # What wakes the loop: a job's outcome from its thread, or None for
        # a NOTIFY or a stop request. One queue, not a queue and an Event:
        # an Event.set per job cost a drain of short jobs a tenth of its time.
        self._inbox: queue.SimpleQueue[tuple[int, Outcome] | None] = queue.SimpleQueue()
        self._arrived: list[tuple[int, Outcome]] = []  # taken by a wait, not reaped yet
        self._unreported: list[tuple[Job, Outcome, float | None]] = []
        self._next_cancel_check = 0.0
        self._next_expire = 0.0
        self._next_rescue = 0.0
        self._db_error: str | None = None          # set while the database fails
        self._reconcile_after_outage = False
        self.boot_id = boot_id()
        self._job_log_dir = settings.job_log_dir   # both built once, not per job
        self._access = settings.access
        self.ended: collections.Counter[str] = collections.Counter()  # outcomes, for the exit line
        # Declared dead by another runner (found at a heartbeat or a check):
        # every job is stopped at once, nothing more is written.
        self.disowned = False
        self._dead_heard = threading.Event()      # set by the heartbeat thread
        self.discarded: collections.Counter[str] = collections.Counter()
        # The lease: a runner is declared dead only once its last heartbeat
        # is heartbeat_timeout old, so until `_lease_until` (monotonic) no
        # one can have. After it, the loop asks before it reaps or writes.
        self._lease = settings.heartbeat_timeout - settings.heartbeat_interval
        self._lease_until = time.monotonic() + self._lease

    # -- one round ---------------------------------------------------------

    def register(self, deadline: float | None) -> int:
        import datetime as dt

        when = dt.datetime.fromtimestamp(deadline, dt.timezone.utc) if deadline else None
        begun = time.monotonic()
        self.runner_id = self.store.runner_register(
            self.settings.node, os.getpid(), self.boot_id, when, __version__)
        self.beat_recorded(begun)
        log.info("runner %s started on %s (pid %s)", self.runner_id, self.settings.node, os.getpid())
        return self.runner_id

    def tick(self) -> TickResult:
        if not self._still_ours():
            self._reap_disowned()
            return TickResult()
        finished = self._reap()
        self._deliver_timeouts()
        slots = self._own_free_slots()
        started: list[Job] = []
        batch = self._unreported + finished
        try:
            asked = self._deliver_cancels()
            asked = self._maintain() or asked
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
            self._database_failed(exc)
        for job in started:
            self._launch(job, self.registry.get(job.action))
        if self._reconcile_after_outage:
            self._reconcile()
        return TickResult(len(finished), len(started),
                          full=bool(started) and len(started) >= slots)

    def _database_failed(self, exc: StoreError) -> None:
        if self._db_error is None:  # one line per change of state, not per query
            log.error("runner %s: database unavailable, not claiming until it is back: %s",
                      self.runner_id, exc)
        self._db_error = str(exc)

    def _database_ok(self) -> None:
        if self._db_error is not None:
            log.info("runner %s: database available again", self.runner_id)
            self._reconcile_after_outage = True
        self._db_error = None

    def _reconcile(self) -> None:
        """A claim or start may have committed while its answer was lost:
        put back what the database says is ours but that we do not run."""
        self._reconcile_after_outage = False
        try:
            fixed = self.store.jobs_reconcile(self.runner_id, list(self.running))
        except StoreError as exc:
            self._database_failed(exc)
            return
        if fixed:
            log.warning("runner %s: %d job(s) it had lost track of put back", self.runner_id, fixed)

    def _own_free_slots(self) -> int:
        """Free slots counting only this process's jobs: when even these fill
        the node, there is no point asking the database."""
        used = usage(r.job.needs for r in self.running.values())
        return sum(max(0, n - used.get(k, 0)) for k, n in self.settings.capacity.items())

    def _maintain(self) -> bool:
        """Now and then: expire what missed its start, rescue dead runners.
        Whether it asked the database anything."""
        now = time.monotonic()
        asked = False
        if self.claiming and now >= self._next_expire:
            self._next_expire = now + self.settings.poll_interval * 5
            expired = self.store.jobs_expire()
            asked = True
            if expired:
                log.info("runner %s: %d job(s) expired", self.runner_id, expired)
        if now >= self._next_rescue:
            self._next_rescue = now + self.settings.heartbeat_interval
            from .rescue import rescue_once

            rescue_once(self.store, self.settings, self.boot_id, self.runner_id)
            asked = True
        return asked

    def _launch(self, job: Job, action: Action | None) -> None:
        """Start the job's thread. An unregistered action (None) starts too,
        to fail at once without importing anything: a row names no code."""
        job_log = JobLog(f"{self._job_log_dir}{os.sep}{job.id}.log", self._access)
        context = JobContext(job.id, job.params, job.attempt, job_log,
                             self._report_progress)
        if action is not None and (action.command is not None or action.isolation == "process"):
            # It starts a process group: the group is recorded for a rescuer.
            context.runner_id = self.runner_id
            context.group_started = functools.partial(self._group_started, job.id)
        self.running[job.id] = RunningJob(job, action, context, time.monotonic())
        log.debug("job %s (%s) started, attempt %s", job.id, job.action, job.attempt)
        self._workers.submit(lambda: self._job_main(job.id, action, context, job_log))

    def _job_main(self, job_id: int, action: Action | None, context: JobContext,
                  job_log: JobLog) -> None:
        """In a worker thread: run the job, hand its outcome to the loop."""
        entry = self.running[job_id]
        with entry.lock:
            entry.ident = threading.get_ident()
            stopped_before = entry.stop_sent
        outcome = stopped_outcome(context.cancel_reason) if stopped_before else None
        while True:
            # A stop raised inside this thread may land after the action
            # returned; loop until the outcome is safely marked done.
            try:
                if outcome is None:
                    outcome = self._execute(action, context, job_log)
                self._mark_done(job_id)
                break
            except JobCanceled:
                outcome = outcome or stopped_outcome(context.cancel_reason)
        self._inbox.put((job_id, self._close_log(context, outcome)))

    def _close_log(self, context: JobContext, outcome: Outcome) -> Outcome:
        """Close the job's log here, in its thread, once no stop can land: the
        loop does no file I/O, so a log that fails cannot cost it outcomes.
        A log that is incomplete costs the job nothing but a note, said once:
        in runjobs.log and in the job's output."""
        context.close_log()
        why = context.log_incomplete
        if why is None:
            return outcome
        log.warning("job %s: its log is incomplete: %s", context.id, why)
        note = f"log incomplete: {why}"
        return dataclasses.replace(
            outcome, output=f"{outcome.output}\n{note}" if outcome.output else note)

    def _execute(self, action: Action | None, context: JobContext, job_log: JobLog) -> Outcome:
        if action is None:
            # A row naming an unregistered action: refused without importing.
            return Outcome(Status.FAILURE, retry=False, error="action is not registered")
        try:
            if action.isolation == "process" and action.command is None:
                from .isolation import run_in_process

                return run_in_process(action, context, job_log, self.settings.grace_period,
                                      self._report_progress)
            return execute(action, context, job_log, self.settings.grace_period)
        except Exception:  # a bug of ours, not of the action: keep the runner alive
            log.exception("job %s: unexpected error", context.id)
            return Outcome(Status.FAILURE, error="runjobs internal error; see runjobs.log")

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
        self._lease_until = 0.0  # rescued under us: the loop asks at once
        self._inbox.put(None)
        return False

    def _mark_done(self, job_id: int) -> None:
        entry = self.running.get(job_id)
        if entry is None:
            return
        with entry.lock:
            entry.done = True
            if entry.stop_sent:  # drop a stop that was sent but not yet raised
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry.ident), None)

    def _reap(self) -> list[tuple[Job, Outcome, float | None]]:
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

    def _count(self, batch: list[tuple[Job, Outcome, float | None]]) -> None:
        """Outcomes recorded, for the exit line: counted once written, so the
        line never claims what the database does not hold."""
        for _job, outcome, _retry in batch:
            self.ended[outcome.status.value] += 1

    def _report(self, results: list[tuple[Job, Outcome, float | None]]) -> None:
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

    # -- declared dead ----------------------------------------------------------

    def beat_recorded(self, begun: float) -> None:
        """A heartbeat that started at `begun` (monotonic) was written: no one
        can declare this runner dead for the next lease."""
        self._lease_until = max(self._lease_until, begun + self._lease)

    def declared_dead(self) -> None:
        """From the heartbeat thread: the runner's row says dead."""
        self._dead_heard.set()
        self._inbox.put(None)

    def _still_ours(self) -> bool:
        """Whether this runner's jobs are still its own: not declared dead by
        another runner. The database is asked only once the lease ran out (a
        heartbeat late, or the whole process stopped, e.g. by SIGSTOP): a
        check per round would cost a drain of short jobs a query per round."""
        if self.disowned:
            return False
        if self._dead_heard.is_set():
            self._disown("found at its heartbeat")
            return False
        if self.runner_id is None or time.monotonic() < self._lease_until:
            return True
        begun = time.monotonic()
        try:
            alive = self.store.runner_heartbeat(self.runner_id)
        except StoreError as exc:
            # Nothing can be written meanwhile either; asked again next round.
            self._database_failed(exc)
            return True
        if not alive:
            self._disown(f"found after {time.monotonic() - self._lease_until + self._lease:.1f}s "
                         "without a heartbeat")
            return False
        self.beat_recorded(begun)
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
            self._stop(entry, "stopped: its runner was declared dead")

    def _reap_disowned(self) -> None:
        """Discard what ended; give up on jobs that ignore their stop for a
        moment (their threads die with the process)."""
        for job_id, outcome in self._ended():
            entry = self.running.pop(job_id, None)
            if entry is not None:
                entry.context.close_log()
            self._discard(job_id, outcome)
        now = time.monotonic()
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

    # -- stops: cancel and timeout ---------------------------------------------

    def _deliver_timeouts(self) -> None:
        """Timeouts, the SIGTERM grace, and giving up on unstoppable jobs."""
        now = time.monotonic()
        grace = self.settings.grace_period
        shutting_down = self._shutdown_at is not None and now >= self._shutdown_at + grace
        for entry in list(self.running.values()):
            timeout = self._timeout_of(entry)
            if timeout is not None and now - entry.started > timeout:
                self._stop(entry, f"timed out after {timeout:g}s")
            elif shutting_down:
                self._stop(entry, "stopped: its runner was asked to stop (SIGTERM)")
            if entry.stop_at is not None and now - entry.stop_at > grace + 2:
                self._give_up(entry)

    def _deliver_cancels(self) -> bool:
        """Stop the running jobs a person canceled (checked every 0.5 s at
        most). Whether it asked the database."""
        now = time.monotonic()
        if not self.running or now < self._next_cancel_check:
            return False
        self._next_cancel_check = now + min(self.settings.poll_interval, 0.5)
        for job_id in self.store.jobs_canceling(self.runner_id):
            if job_id in self.running:
                self._stop(self.running[job_id], "canceled")
        return True

    def _timeout_of(self, entry: RunningJob) -> float | None:
        if entry.job.timeout is not None:
            return entry.job.timeout
        if entry.action is not None and entry.action.timeout is not None:
            return entry.action.timeout
        return self.settings.default_timeout

    def _stop(self, entry: RunningJob, reason: str) -> None:
        with entry.lock:
            if entry.done or entry.stop_sent:
                return
            entry.stop_sent = True
            entry.stop_at = time.monotonic()
            entry.context.request_cancel(reason)
            log.info("job %s: %s, stopping it", entry.job.id, reason)
            # Commands and process-isolated callables watch context.canceled
            # and stop their process group; a callable in a thread gets the
            # exception raised inside it.
            # Not picked up yet (ident None): the worker sees stop_sent.
            if entry.ident is not None and entry.action is not None \
                    and entry.action.command is None and entry.action.isolation == "thread":
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(entry.ident), ctypes.py_object(JobCanceled))

    def _give_up(self, entry: RunningJob) -> None:
        """A job that ignored its stop for the whole grace period (stuck in C
        code, or catching everything): record it FAILURE and stop waiting.
        Its thread is a daemon and dies with this process."""
        with entry.lock:
            if entry.done:
                return
            entry.done = True
        self.running.pop(entry.job.id, None)
        self.abandoned += 1
        error = (f"could not be stopped ({entry.context.cancel_reason}); gave up after "
                 f"{self.settings.grace_period:g}s grace, its thread dies with the runner")
        log.error("job %s: %s", entry.job.id, error)
        self._report([(entry.job, Outcome(Status.FAILURE, error=error, retry=False,
                                          keep_status=True), None)])

    def _report_progress(self, job_id: int, done, total, message) -> None:
        try:
            self.store.job_progress(job_id, done, total, message)
        except StoreError as exc:
            log.warning("job %s: progress not recorded: %s", job_id, exc)

    # -- the loop --------------------------------------------------------------

    def stop_claiming(self) -> None:
        """At the deadline (or on SIGTERM): claim nothing more and put back
        what was claimed but not started."""
        if not self.claiming:
            return
        self.claiming = False
        try:
            self.store.jobs_unclaim(self.runner_id)
            self.store.runner_set_state(self.runner_id, "draining")
        except StoreError as exc:
            # What stays QUEUED under this runner is rescued once it is gone.
            self._database_failed(exc)
        log.info("runner %s stops claiming; %d job(s) still running",
                 self.runner_id, len(self.running))

    def run(self, deadline: float | None, once: bool = False,
            on_stop_claiming: Callable[[], None] | None = None) -> None:
        """Loop until the deadline (wall clock; None with `once`: until
        nothing is left), then drain the jobs still running."""
        if self.runner_id is None:
            self.register(deadline)
        heartbeat = _Heartbeat(self)
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
            self._next_cancel_check = 0.0
        self._inbox.put(None)

    def _loop(self, deadline: float | None, once: bool,
              on_stop_claiming: Callable[[], None] | None) -> None:
        while True:
            if self.claiming and (self.stop_requested or (deadline and self.clock() >= deadline)):
                self.stop_claiming()
                if on_stop_claiming:
                    on_stop_claiming()
            # A job that ends during the round stays in the inbox, so the
            # wait below returns at once.
            round_at = time.monotonic()
            try:
                result = self.tick()
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
        until = time.monotonic() + GATHER
        while (len(self._arrived) + self._inbox.qsize() < len(self.running)
               and time.monotonic() < until):
            time.sleep(GATHER / 10)

    def _nothing_active(self) -> bool:
        try:
            return self.store.jobs_count_active(self.settings.node) == 0
        except StoreError as exc:  # not known: keep going, as tick() does
            self._database_failed(exc)
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
        wait = interval - min(POLL_SLACK, interval / 20) - (time.monotonic() - round_at)
        if self.running:
            wait = min(wait, 0.5)  # timeouts and cancels are checked each round
        if self.claiming and deadline:
            wait = min(wait, deadline - self.clock())
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
            self.store.runner_set_state(self.runner_id, "exited")
        except StoreError as exc:
            log.error("runner %s: could not record its exit: %s", self.runner_id, exc)
        log.info("runner %s exited; jobs ended: %s", self.runner_id, _counted(self.ended))

    def request_stop(self, *_args) -> None:
        """Signal handler: only set flags; the loop does the work. Running
        jobs get `grace_period` to end; a second signal stops them at once."""
        now = time.monotonic()
        if self.stop_requested:
            now -= self.settings.grace_period
        self._shutdown_at = now
        self.stop_requested = True
        self._inbox.put(None)  # SimpleQueue.put may be called from a signal handler


def _counted(counts: collections.Counter[str]) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


class _Workers:
    """Job threads, kept for the whole cycle: starting a thread per job costs
    more than a short job. Grows to the most jobs run at once; a worker given
    up as stuck is simply never idle again, and a new one takes its place."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1
        if not reuse:
            threading.Thread(target=self._work, name="job-worker", daemon=True).start()
        self._tasks.put(task)

    def _work(self) -> None:
        while True:
            try:
                self._tasks.get()()
            except JobCanceled:  # a stop that landed after its job: nothing to stop
                pass
            with self._lock:
                self._idle += 1


class _Heartbeat(threading.Thread):
    """Beats from its own thread so a busy loop or a long job cannot starve it.
    A beat that finds the runner declared dead tells the runner and stops:
    after a SIGSTOP that is the first thing to run, one interval at most."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.runner = runner
        self.store, self.runner_id = runner.store, runner.runner_id
        self.interval = runner.settings.heartbeat_interval
        self._stopped = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            begun = time.monotonic()
            try:
                alive = self.store.runner_heartbeat(self.runner_id)
            except StoreError as exc:
                if not self._failing:
                    log.error("runner %s: heartbeat failed: %s", self.runner_id, exc)
                self._failing = True
                continue
            if not alive:
                self.runner.declared_dead()
                return
            self.runner.beat_recorded(begun)
            if self._failing:
                log.info("runner %s: heartbeat recorded again", self.runner_id)
            self._failing = False

    def stop(self) -> None:
        self._stopped.set()


def install_signal_handlers(runner: Runner) -> None:
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
