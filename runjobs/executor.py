"""Run one job and classify what happened into an Outcome.

Touches no database: the runner hands the Outcome to the store afterwards, so
return-value mapping, exit codes and DoNotRetry are testable on their own.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import string
import subprocess
import traceback
from typing import Any, Mapping

from .actions import Action, JobCanceled, JobContext, JobLog
from .errors import DoNotRetry
from .groups import child_environment, die_with_runner
from .models import Outcome, Status

log = logging.getLogger("runjobs.executor")

_RESULT_STATUSES = {"SUCCESS": Status.SUCCESS, "WARNING": Status.WARNING,
                    "FAILURE": Status.FAILURE}


def execute(action: Action, ctx: JobContext, job_log: JobLog, grace: float = 10.0) -> Outcome:
    """Run the action for the job in `ctx` and return its Outcome. Never raises
    (but JobCanceled and the like that arrive outside the action's call)."""
    try:
        if action.command is not None:
            return run_command(action, ctx, job_log, grace)
        return classify_return(action.resolve()(ctx))
    except JobCanceled as stop:
        return stopped_outcome(str(stop) or ctx.cancel_reason)
    except DoNotRetry as exc:
        ctx.log.error("failed, not to be retried: %s", exc)
        return Outcome(Status.FAILURE, error=_one_line(exc), retry=False)
    except Exception as exc:  # the action's own failure: log it, then classify
        ctx.log.error("failed:\n%s", traceback.format_exc().rstrip())
        return Outcome(Status.FAILURE, error=_one_line(exc))


def stopped_outcome(reason: str) -> Outcome:
    """A canceled job ends CANCELED; one stopped by its timeout, FAILURE."""
    if reason.startswith("timed out"):
        return Outcome(Status.FAILURE, error=reason)
    return Outcome(Status.CANCELED, error=reason, retry=False)


def classify_return(value: Any) -> Outcome:
    """Map what a callable returned: None or a status name, or a CloudBolt-style
    tuple (status, output[, error])."""
    if value is None:
        return Outcome(Status.SUCCESS)
    output = error = None
    status = value
    if isinstance(value, tuple) and 1 <= len(value) <= 3:
        status, output, error = (tuple(value) + (None, None))[:3]
    if isinstance(status, str) and status.upper() in _RESULT_STATUSES:
        return Outcome(_RESULT_STATUSES[status.upper()],
                       output=_text(output), error=_text(error))
    return Outcome(Status.FAILURE, retry=False,
                   error=f"action returned {value!r}: expected None, a status name "
                         "(SUCCESS, WARNING, FAILURE) or (status, output, error)")


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- commands ------------------------------------------------------------------

class _ArgvFormatter(string.Formatter):
    """`{name}` only: no attribute or index lookups on params."""

    def get_field(self, field_name, args, kwargs):
        if not field_name.isidentifier():
            raise DoNotRetry(f"bad placeholder {{{field_name}}}: use {{param_name}}")
        if field_name not in kwargs:
            raise DoNotRetry(f"missing param {field_name!r} for the command")
        return kwargs[field_name], field_name


def command_argv(template: tuple[str, ...], params: Mapping[str, Any]) -> list[str]:
    """Each `{param}` replaced inside its own argv element: a param can never
    become a second argument, let alone a second command."""
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    formatter = _ArgvFormatter()
    return [formatter.vformat(part, (), values) for part in template]


def run_command(action: Action, ctx: JobContext, job_log: JobLog, grace: float) -> Outcome:
    argv = command_argv(action.command, ctx.params)
    job_log.write(f"--- attempt {ctx.attempt}: {argv!r}\n".encode())
    # Its output comes through a pipe, copied to the log here, not straight
    # to the log file: on a full disk the command's own writes would fail,
    # and with them the command, for the sake of its log.
    read_fd, write_fd = os.pipe()
    try:
        try:
            # No shell, its own session (process group) so a stop reaches
            # every process it started; dies with its runner (groups.py).
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=write_fd,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       close_fds=True, env=child_environment(ctx.runner_id, ctx.id),
                                       preexec_fn=die_with_runner())
        except OSError as exc:
            return Outcome(Status.FAILURE, error=f"cannot start {argv[0]}: {exc.strerror}",
                           retry=False)
        finally:
            os.close(write_fd)  # the command has its own: the pipe ends when it is done
        if not group_recorded(process, ctx):
            return DISOWNED
        try:
            code = _wait_or_stop(process, read_fd, job_log, ctx, grace)
        finally:
            copy_output(read_fd, job_log)  # what it wrote last, or while it was stopped
    finally:
        os.close(read_fd)
    if ctx.canceled:
        return stopped_outcome(ctx.cancel_reason)
    return classify_exit(code, action)


# What a job whose runner was declared dead ends with; the runner discards it.
DISOWNED = Outcome(Status.FAILURE, retry=False,
                   error="stopped: its runner was declared dead, the job was rescued")


def group_recorded(process: subprocess.Popen, ctx: JobContext) -> bool:
    """Tell the runner the child's process group exists (it records it for a
    rescuer). False if the job is no longer the runner's: the group is then
    killed at once, before it does anything more."""
    if ctx.group_started is None or ctx.group_started(process.pid):
        return True
    signal_group(process.pid, signal.SIGKILL)
    process.wait()
    return False


def _wait_or_stop(process: subprocess.Popen, output: int, job_log: JobLog, ctx: JobContext,
                  grace: float) -> int:
    """Copy the command's output to its log until it exits; stop its group
    when the job is stopped."""
    piped = True  # until the pipe's end: then only wait
    while process.poll() is None:
        try:
            if ctx.canceled:
                return stop_process_group(process, grace)
            if piped:
                piped = copy_output(output, job_log, wait=0.1)
            else:
                process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        except JobCanceled:
            # The runner raised the stop inside this thread: stop the group,
            # then let the caller classify.
            stop_process_group(process, grace)
            raise
    return process.returncode


def copy_output(fd: int, job_log: JobLog, wait: float | None = None) -> bool:
    """Copy what the pipe `fd` holds to the job's log: with `wait`, one read
    once something is there (at most `wait` seconds); without, everything
    there is now. False once the pipe is at its end (every writer gone).
    Output the log cannot take is read all the same, and dropped."""
    if wait is not None:
        poller = select.poll()  # not select(): a busy runner's descriptors pass 1024
        poller.register(fd, select.POLLIN)
        return not poller.poll(wait * 1000) or _copy_chunk(fd, job_log)
    os.set_blocking(fd, False)
    try:
        while _copy_chunk(fd, job_log):
            pass
    except BlockingIOError:  # nothing more for now: a child it left behind may write later
        return True
    finally:
        os.set_blocking(fd, True)
    return False


def _copy_chunk(fd: int, job_log: JobLog) -> bool:
    chunk = os.read(fd, 65536)
    if not chunk:
        return False
    job_log.write(chunk)
    return True


def stop_process_group(process: subprocess.Popen, grace: float) -> int:
    """SIGTERM to the whole group, SIGKILL after `grace` seconds."""
    signal_group(process.pid, signal.SIGTERM)
    try:
        code = process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        code = process.wait()
    # Children that outlived their leader still hold the group: end them too.
    signal_group(process.pid, signal.SIGKILL)
    return code


def signal_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; one that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def classify_exit(code: int, action: Action) -> Outcome:
    if code == 0:
        return Outcome(Status.SUCCESS)
    if code in action.warning_exit_codes:
        return Outcome(Status.WARNING, error=f"exited with code {code}")
    if code < 0:
        return Outcome(Status.FAILURE, error=f"killed by signal {_signal_name(-code)}")
    return Outcome(Status.FAILURE, error=f"exited with code {code}",
                   retry=code not in action.final_exit_codes)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
