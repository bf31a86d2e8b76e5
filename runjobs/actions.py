"""The action registry, the job context, and the built-in actions.

Only registered actions run: a database row names an action by its name, and
the name is looked up here (built-ins, `[actions.NAME]` in the config, then
the `runjobs.actions` entry-point group). A name that is none of these is
refused without importing anything.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import Settings, parse_duration, validate_capacity
from .limits import INT_MAX, INT_MIN
from .errors import ConfigError, DoNotRetry, UsageError
from .files import Access

ENTRY_POINT_GROUP = "runjobs.actions"
ISOLATIONS = ("thread", "process")


class JobCanceled(BaseException):
    """Raised inside a job's thread when it is canceled or times out.

    A BaseException, like KeyboardInterrupt, so that an action's own
    `except Exception` does not swallow the stop.
    """


@dataclasses.dataclass(frozen=True)
class Action:
    """A registered action and its defaults."""

    name: str
    function: Callable[["JobContext"], Any] | None = None  # built-ins
    target: str | None = None                              # "package.module:function"
    command: tuple[str, ...] | None = None
    timeout: float | None = None
    retries: int = 0
    priority: int = 0
    needs: Mapping[str, int] | None = None
    isolation: str = "thread"
    final_exit_codes: frozenset[int] = frozenset()
    warning_exit_codes: frozenset[int] = frozenset()

    def resolve(self) -> Callable[["JobContext"], Any]:
        """The callable to run; imports its module (only for a registered name)."""
        if self.function is not None:
            return self.function
        module_name, _, attribute = (self.target or "").partition(":")
        if not module_name or not attribute:
            raise DoNotRetry(f"action {self.name}: callable must be 'package.module:function'")
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
        return target


class JobLog:
    """The job's own log file, opened only when something is written to it.

    A convenience, never a reason for a job to fail: the first error writing
    or closing it (a full disk, a folder that cannot be made) is kept in
    `incomplete`, and what comes after is dropped, so the job goes on and
    the runner says once that its log is incomplete, not once per line.
    One thread writes at a time: the job's handler holds its own lock, and
    a command's output is copied by its job's thread.
    """

    # Class defaults, not set per job: a job that never logs pays nothing.
    _fd: int | None = None
    incomplete: str | None = None  # why the log is incomplete (its first failure)

    def __init__(self, path: Path | str, access: Access) -> None:
        self._where = path   # made a Path only for a job that logs: most never do
        self.access = access

    @functools.cached_property
    def path(self) -> Path:
        return Path(self._where)

    def write(self, data: bytes) -> None:
        """Append `data`, opening the file on the first write (a new log gets
        the owner(-group) mode). Never raises OSError: see `incomplete`."""
        if self.incomplete is not None:
            return
        try:
            if self._fd is None:
                self._fd = self.access.open_file(self.path, os.O_WRONLY | os.O_APPEND)
            view = memoryview(data)
            while view:  # a write cut short by a filling disk: the next one says why
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self._failed(f"writing {self.path}", exc, "the rest of the log was dropped")

    def close(self) -> None:
        """Close the file if it is open. Never raises OSError: see `incomplete`."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.close(fd)
        except OSError as exc:  # NFS, say, reports a full disk only here
            self._failed(f"closing {self.path}", exc, "its end may be missing")

    def note_incomplete(self, reason: str) -> None:
        """Record why the log is incomplete (another process found out), if
        nothing did before."""
        if self.incomplete is None:
            self.incomplete = reason

    def _failed(self, doing: str, exc: OSError, so: str) -> None:
        why = exc.strerror or str(exc)
        if exc.errno in errno.errorcode:
            why = f"{why} ({errno.errorcode[exc.errno]})"
        self.note_incomplete(f"{doing} failed: {why}; {so}")
        self.close()

    def logger(self, job_id: int) -> logging.Logger:
        # A Logger made directly is not registered in logging's global
        # manager, so a runner does not keep one per job it ran.
        logger = logging.Logger(f"runjobs.job.{job_id}", logging.DEBUG)
        handler = _JobLogHandler(self)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        return logger


class _JobLogHandler(logging.Handler):
    """Each line into the JobLog, one write per line as a FileHandler did;
    once the log has failed, lines are dropped without a word (the runner
    says it once, when the job ends)."""

    def __init__(self, job_log: JobLog) -> None:
        super().__init__()
        self._job_log = job_log

    def emit(self, record: logging.LogRecord) -> None:
        if self._job_log.incomplete is not None:
            return
        try:
            line = self.format(record) + "\n"
        except Exception:  # the action's bad format string: logging's usual report
            self.handleError(record)
            return
        self._job_log.write(line.encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        self._job_log.close()
        super().close()


class JobContext:
    """What a callable action receives: its job's params, id, attempt, log,
    progress reporting and cancellation."""

    def __init__(self, job_id: int, params: Mapping[str, Any], attempt: int,
                 job_log: "JobLog", report_progress: Callable[..., None] | None = None) -> None:
        self.id = job_id
        self.params = dict(params)
        self.attempt = attempt
        self._job_log = job_log
        self._log: logging.Logger | None = None
        self._report_progress = report_progress
        self._cancel = threading.Event()
        self.cancel_reason = "canceled"
        # Set by the runner for a job that starts a process (a command, or
        # isolation = "process"): its id, for the group's marker, and what to
        # call once the process group exists, which answers False when the
        # job is no longer the runner's (see runjobs/groups.py).
        self.runner_id: int | None = None
        self.group_started: Callable[[int], bool] | None = None

    @property
    def log(self) -> logging.Logger:
        """A logger writing to the job's own log; made on first use, and the
        file opened on the first line written."""
        if self._log is None:
            self._log = self._job_log.logger(self.id)
        return self._log

    def close_log(self) -> None:
        """Close the job's log. Never raises OSError: a failure is kept in
        the JobLog's `incomplete`."""
        if self._log is not None:
            for handler in self._log.handlers:
                handler.close()
        self._job_log.close()

    @property
    def log_incomplete(self) -> str | None:
        """Why the job's log is incomplete; None while it is whole."""
        return self._job_log.incomplete

    @property
    def canceled(self) -> bool:
        return self._cancel.is_set()

    def check_canceled(self) -> None:
        """Raise JobCanceled if the job was canceled or timed out."""
        if self._cancel.is_set():
            raise JobCanceled(self.cancel_reason)

    def request_cancel(self, reason: str = "canceled") -> None:
        self.cancel_reason = reason
        self._cancel.set()

    def wait(self, seconds: float) -> None:
        """Sleep, but wake and raise JobCanceled as soon as the job is stopped."""
        if self._cancel.wait(seconds):
            raise JobCanceled(self.cancel_reason)

    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        if self._report_progress is not None:
            self._report_progress(self.id, done, total, message)


# -- built-in actions ----------------------------------------------------------

def _number(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DoNotRetry(f"param {name} must be a number, got {value!r}") from None


def builtin_sleep(ctx: JobContext) -> None:
    """Sleeps `seconds` (default 60); a test action for checking a runner."""
    seconds = _number(ctx.params, "seconds", 60)
    ctx.log.info("sleeping %gs", seconds)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.wait(min(left, 0.5))


def builtin_fail(ctx: JobContext) -> None:
    """Fails at once (retries apply)."""
    raise RuntimeError(str(ctx.params.get("message", "failed on purpose (the fail action)")))


def builtin_noop(ctx: JobContext) -> None:
    """Returns at once."""


BUILTINS = {
    "sleep": Action("sleep", function=builtin_sleep),
    "fail": Action("fail", function=builtin_fail),
    "noop": Action("noop", function=builtin_noop),
}


# -- the registry ----------------------------------------------------------------

def _codes(spec: Mapping[str, Any], key: str, name: str) -> frozenset[int]:
    try:
        return frozenset(int(c) for c in spec.get(key, ()))
    except (TypeError, ValueError):
        raise ConfigError(f"actions.{name}.{key}: expected a list of exit codes") from None


def action_from_config(name: str, spec: Mapping[str, Any], settings: Settings) -> Action:
    """Validate one `[actions.NAME]` table; ConfigError names the bad key."""
    where = f"actions.{name}"
    command = spec.get("command")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command)
    ):
        raise ConfigError(f"{where}.command: expected a list of strings (argv, no shell)")
    isolation = spec.get("isolation", "thread")
    if isolation not in ISOLATIONS:
        raise ConfigError(f"{where}.isolation: expected thread or process, got {isolation!r}")
    timeout = spec.get("timeout")
    return Action(
        name=name,
        target=spec.get("callable"),
        command=tuple(command) if command else None,
        timeout=parse_duration(timeout, f"{where}.timeout") if timeout is not None else None,
        retries=_whole(spec.get("retries", 0), f"{where}.retries"),
        priority=_whole(spec.get("priority", 0), f"{where}.priority", negative=True),
        needs=validate_capacity(spec["needs"], f"{where}.needs") if "needs" in spec else None,
        isolation=isolation,
        final_exit_codes=_codes(spec, "final_exit_codes", name),
        warning_exit_codes=_codes(spec, "warning_exit_codes", name)
        | frozenset(settings.warning_exit_codes),
    )


def _whole(value: Any, key: str, negative: bool = False) -> int:
    # The bounds of a job's own priority and retries (runjobs.limits), so a
    # default that no job could store is named here, not at every submit.
    low = INT_MIN if negative else 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT_MAX:
        raise ConfigError(f"{key}: expected a whole number from {low} to {INT_MAX}, "
                          f"got {value!r}")
    return value


class Registry:
    """Looks actions up by name. Entry points are read only for a name that
    is neither built in nor in the config, so the common path stays cheap."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._actions: dict[str, Action] = dict(BUILTINS)
        for name, spec in settings.actions.items():
            self._actions[name] = action_from_config(name, spec, settings)
        self._entry_points_read = False

    def get(self, name: str) -> Action | None:
        """The action, or None when the name is not registered."""
        if name not in self._actions and not self._entry_points_read:
            self._read_entry_points()
        return self._actions.get(name)

    def require(self, name: str) -> Action:
        action = self.get(name)
        if action is None:
            raise UsageError(f"unknown action {name!r}: not built in, not in [actions] of the "
                             "config, not in the runjobs.actions entry points")
        return action

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(self._actions)

    def _read_entry_points(self) -> None:
        from importlib.metadata import entry_points

        self._entry_points_read = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            self._actions.setdefault(entry.name, Action(entry.name, target=entry.value))
