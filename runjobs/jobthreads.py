"""The jobs a runner runs, each in a thread of its own, and how they stop.

A job's thread runs its action (a callable, a command, or a callable in a
child process) and puts `(job id, Outcome)` in the runner's inbox; the
runner's loop does everything else. Stopping a job (cancel, timeout,
SIGTERM, a runner declared dead) means: a command's or child process's
group is signalled by the code watching it (`context.canceled`); a callable
in a thread gets `JobCanceled` raised inside it. This module touches no
database.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import threading
from typing import Callable

from .actions import Action, JobCanceled, JobContext, JobLog
from .clock import Clock
from .config import Settings
from .executor import execute, stopped_outcome
from .models import Job, Outcome, Status

log = logging.getLogger("runjobs.runner")

# (job id, pgid) -> whether the job is still the runner's (see Runner).
GroupStarted = Callable[[int, int], bool]
ReportProgress = Callable[..., None]


@dataclasses.dataclass
class RunningJob:
    job: Job
    action: Action | None
    context: JobContext
    started: float                     # monotonic
    ident: int | None = None           # the worker thread running it, once picked up
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    done: bool = False                 # the thread has its outcome; no more stops
    stop_sent: bool = False
    stop_at: float | None = None       # monotonic time the stop was sent
    pgid: int | None = None            # a command's process group, once recorded


class JobThreads:
    """This process's running jobs, by id. The runner's loop launches and
    stops them; their threads only hand outcomes to `inbox`."""

    def __init__(self, settings: Settings, clock: Clock,
                 inbox: "queue.SimpleQueue[tuple[int, Outcome] | None]",
                 report_progress: ReportProgress) -> None:
        self.settings = settings
        self.clock = clock
        self.inbox = inbox
        self.running: dict[int, RunningJob] = {}
        self._report_progress = report_progress
        self._workers = _Workers()
        self._job_log_dir = settings.job_log_dir   # both built once, not per job
        self._access = settings.access

    def launch(self, job: Job, action: Action | None, runner_id: int | None,
               group_started: GroupStarted) -> None:
        """Start the job's thread. An unregistered action (None) starts too,
        to fail at once without importing anything: a row names no code."""
        job_log = JobLog(f"{self._job_log_dir}{os.sep}{job.id}.log", self._access)
        context = JobContext(job.id, job.params, job.attempt, job_log, self._report_progress)
        if action is not None and (action.command is not None or action.isolation == "process"):
            # It starts a process group: the group is recorded for a rescuer.
            context.runner_id = runner_id
            context.group_started = lambda pgid: group_started(job.id, pgid)
        self.running[job.id] = RunningJob(job, action, context, self.clock.monotonic())
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
        self.inbox.put((job_id, _close_log(context, outcome)))

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

    def _mark_done(self, job_id: int) -> None:
        entry = self.running.get(job_id)
        if entry is None:
            return
        with entry.lock:
            entry.done = True
            if entry.stop_sent:  # drop a stop that was sent but not yet raised
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry.ident), None)

    # -- stopping ------------------------------------------------------------------

    def stop(self, entry: RunningJob, reason: str) -> None:
        with entry.lock:
            if entry.done or entry.stop_sent:
                return
            entry.stop_sent = True
            entry.stop_at = self.clock.monotonic()
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

    def stop_overdue(self, now: float, shutdown_at: float | None) -> list[RunningJob]:
        """Stop jobs past their timeout, or all once the SIGTERM grace is up;
        returns the jobs that ignored their stop for the whole grace period
        (and 2 s more): the caller gives up on them."""
        grace = self.settings.grace_period
        shutting_down = shutdown_at is not None and now >= shutdown_at + grace
        stuck = []
        for entry in list(self.running.values()):
            timeout = self.timeout_of(entry)
            if timeout is not None and now - entry.started > timeout:
                self.stop(entry, f"timed out after {timeout:g}s")
            elif shutting_down:
                self.stop(entry, "stopped: its runner was asked to stop (SIGTERM)")
            if entry.stop_at is not None and now - entry.stop_at > grace + 2:
                stuck.append(entry)
        return stuck

    def timeout_of(self, entry: RunningJob) -> float | None:
        if entry.job.timeout is not None:
            return entry.job.timeout
        if entry.action is not None and entry.action.timeout is not None:
            return entry.action.timeout
        return self.settings.default_timeout

    def give_up(self, entry: RunningJob) -> Outcome | None:
        """A job that ignored its stop for the whole grace period (stuck in C
        code, or catching everything): its FAILURE, to record, and no more
        waiting for it. Its thread is a daemon and dies with this process.
        None if its outcome came meanwhile."""
        with entry.lock:
            if entry.done:
                return None
            entry.done = True
        self.running.pop(entry.job.id, None)
        error = (f"could not be stopped ({entry.context.cancel_reason}); gave up after "
                 f"{self.settings.grace_period:g}s grace, its thread dies with the runner")
        log.error("job %s: %s", entry.job.id, error)
        return Outcome(Status.FAILURE, error=error, retry=False, keep_status=True)


def _close_log(context: JobContext, outcome: Outcome) -> Outcome:
    """Close the job's log in its own thread, once no stop can land: the
    loop does no file I/O, so a log that fails cannot cost it outcomes. A
    log that is incomplete costs the job nothing but a note, said once: in
    runjobs.log and in the job's output."""
    context.close_log()
    why = context.log_incomplete
    if why is None:
        return outcome
    log.warning("job %s: its log is incomplete: %s", context.id, why)
    note = f"log incomplete: {why}"
    return dataclasses.replace(
        outcome, output=f"{outcome.output}\n{note}" if outcome.output else note)


class _Workers:
    """Job threads, kept for the whole cycle: starting a thread per job costs
    more than a short job. Grows to the most jobs run at once; a worker given
    up as stuck is simply never idle again, and a new one takes its place.
    A worker thread lives as long as the runner: a command's parent-death
    signal (groups.py) fires when the thread that started it ends."""

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
