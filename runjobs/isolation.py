"""`isolation = "process"`: a callable run in a child process of the runner.

A stop is then a hard kill of the child's process group (SIGTERM, SIGKILL
after the grace period) even for code stuck in C or ignoring exceptions, and
the job's own peak memory is measured (the child's VmHWM).

The parent sends the job as JSON on the child's stdin; the child writes JSON
lines back on a pipe: progress reports, then its outcome. Its stdout and
stderr come on another pipe, and the parent copies them to the job's log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .actions import BUILTINS, Action, JobCanceled, JobContext, JobLog
from .files import Access
from .executor import DISOWNED, execute, group_recorded, signal_group, stopped_outcome
from .groups import child_environment, die_with_runner
from .models import Outcome, Status

ProgressCallback = Callable[[int, Any, Any, Any], None]


def run_in_process(action: Action, ctx: JobContext, job_log: JobLog, grace: float,
                   report_progress: ProgressCallback | None = None) -> Outcome:
    """Run the callable of `action` in a child process; returns its Outcome
    with the child's peak RSS."""
    pipes = _ChildPipes(job_log)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "runjobs.isolation", str(pipes.results_end)],
            stdin=subprocess.PIPE, stdout=pipes.output_end, stderr=subprocess.STDOUT,
            pass_fds=(pipes.results_end,), start_new_session=True, close_fds=True,
            env=child_environment(ctx.runner_id, ctx.id), preexec_fn=die_with_runner())
        pipes.close_child_ends()
        if not group_recorded(process, ctx):
            process.stdin.close()
            return DISOWNED
        _send_request(process, action, ctx, job_log)
        message, code, peak_kb = _watch(process, pipes, ctx, grace, report_progress)
    finally:
        pipes.close()
    if ctx.canceled:
        outcome = stopped_outcome(ctx.cancel_reason)
    elif message:
        if message.get("log_incomplete"):
            job_log.note_incomplete(message["log_incomplete"])
        outcome = Outcome(Status(message["status"]), output=message.get("output"),
                          error=message.get("error"), retry=message.get("retry", True))
    else:
        outcome = Outcome(Status.FAILURE, error=f"child process exited with code {code} "
                                                "without an outcome")
    return Outcome(outcome.status, outcome.output, outcome.error, outcome.retry, peak_kb)


def _send_request(process: subprocess.Popen, action: Action, ctx: JobContext,
                  job_log: JobLog) -> None:
    request = {"name": action.name, "target": action.target, "id": ctx.id,
               "params": ctx.params, "attempt": ctx.attempt, "log": str(job_log.path),
               "access": dataclasses.astuple(job_log.access)}
    try:
        process.stdin.write(json.dumps(request).encode())
        process.stdin.close()
    except BrokenPipeError:
        pass


class _ChildPipes:
    """What the parent reads from its child: JSON messages on one pipe, and
    the child's stdout and stderr on another, copied to the job's log here.
    Not the log file as the child's stdout: on a full disk the child's own
    writes (a print) would fail, and the job with them, for a log."""

    def __init__(self, job_log: JobLog) -> None:
        self.results, self.results_end = os.pipe()
        self.output, self.output_end = os.pipe()
        self._job_log = job_log
        self._reading = [self.results, self.output]  # until each pipe's end
        self._buffer = b""

    def close_child_ends(self) -> None:
        """The child has its own copies: each pipe ends when the child is done."""
        for fd in (self.results_end, self.output_end):
            os.close(fd)
        self.results_end = self.output_end = None

    def read(self, timeout: float) -> list[dict]:
        """Waits up to `timeout` seconds for either pipe; the messages read whole."""
        poller = select.poll()  # not select(): a busy runner's descriptors pass 1024
        for fd in self._reading:
            poller.register(fd, select.POLLIN)
        messages: list[dict] = []
        for fd, _ in poller.poll(timeout * 1000):
            messages += self._take(fd)
        return messages

    def drain(self) -> list[dict]:
        """What the pipes hold now, without waiting: the child has exited,
        its last message may not have been read yet."""
        messages: list[dict] = []
        for fd in list(self._reading):
            os.set_blocking(fd, False)
            try:
                while fd in self._reading:
                    messages += self._take(fd)
            except BlockingIOError:  # a process it left behind holds the pipe
                pass
        return messages

    def _take(self, fd: int) -> list[dict]:
        chunk = os.read(fd, 65536)
        if not chunk:
            self._reading.remove(fd)
            return []
        if fd == self.output:
            self._job_log.write(chunk)  # never raises: a failure is noted in the JobLog
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        for fd in (self.results, self.output, self.results_end, self.output_end):
            if fd is not None:
                os.close(fd)


def _watch(process: subprocess.Popen, pipes: _ChildPipes, ctx: JobContext, grace: float,
           report_progress: ProgressCallback | None) -> tuple[dict, int, int]:
    """Read the child's messages until it exits, stopping it when asked.
    Returns (its outcome message, exit code, peak RSS in KiB)."""
    outcome: dict = {}
    stopped = False
    peak_kb = 0
    while True:
        outcome = _handle_all(pipes.read(0.1), ctx, report_progress) or outcome
        peak_kb = max(peak_kb, _peak_rss_kb(process.pid))
        pid, status = os.waitpid(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            outcome = _handle_all(pipes.drain(), ctx, report_progress) or outcome
            return outcome, process.returncode, max(peak_kb, outcome.get("peak_rss_kb") or 0)
        if ctx.canceled and not stopped:
            stopped = True
            _stop_and_reap(process, grace)


def _peak_rss_kb(pid: int) -> int:
    """The process's own peak RSS since its exec (VmHWM), 0 once it is gone.

    Not the child's ru_maxrss: that keeps the runner's size from the fork
    before the exec, which is not the job's memory."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _stop_and_reap(process: subprocess.Popen, grace: float) -> None:
    # Not executor.stop_process_group, which blocks: _watch keeps sampling
    # the child's memory and reaps it.
    threading.Thread(target=_signal_later, args=(process.pid, grace), daemon=True).start()


def _signal_later(pid: int, grace: float) -> None:
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    signal_group(pid, signal.SIGKILL)


def _handle_all(messages: list[dict], ctx: JobContext,
                report_progress: ProgressCallback | None) -> dict | None:
    """Report progress messages; the last outcome message among them, if any."""
    outcome = None
    for message in messages:
        if "progress" in message and report_progress is not None:
            report_progress(ctx.id, *message["progress"])
        outcome = message.get("outcome") or outcome
    return outcome


# -- the child ------------------------------------------------------------------

def _child(result_fd: int) -> int:
    request = json.loads(sys.stdin.read())
    results = os.fdopen(result_fd, "w", buffering=1)

    def send(message: dict) -> None:
        results.write(json.dumps(message) + "\n")

    job_log = JobLog(Path(request["log"]), Access(*request["access"]))
    ctx = JobContext(request["id"], request["params"], request["attempt"], job_log,
                     lambda _id, done, total, message: send({"progress": [done, total, message]}))

    def on_term(_signum, _frame):
        ctx.request_cancel("stopped")
        raise JobCanceled("stopped")

    signal.signal(signal.SIGTERM, on_term)
    action = BUILTINS.get(request["name"]) if not request["target"] else None
    action = action or Action(request["name"], target=request["target"])
    outcome = execute(action, ctx, job_log)
    ctx.close_log()  # before the outcome: whether the log is whole is part of it
    send({"outcome": {"status": outcome.status.value, "output": outcome.output,
                      "error": outcome.error, "retry": outcome.retry,
                      "peak_rss_kb": _peak_rss_kb(os.getpid()),
                      "log_incomplete": ctx.log_incomplete}})
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
