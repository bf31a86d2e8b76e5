"""`isolation = "process"`: a callable run in a child process of the runner.

A stop is then a hard kill of the child's process group (SIGTERM, SIGKILL
after the grace period) even for code stuck in C or ignoring exceptions, and
the job's own peak memory is measured (the child's VmHWM).

The parent sends the job as JSON on the child's stdin; the child writes JSON
lines back on a pipe: progress reports, then its outcome. Its stdout and
stderr go to the job's log.
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
    read_fd, write_fd = os.pipe()
    log_fd = job_log.open_fd()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "runjobs.isolation", str(write_fd)],
            stdin=subprocess.PIPE, stdout=log_fd, stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), start_new_session=True, close_fds=True,
            env=child_environment(ctx.runner_id, ctx.id), preexec_fn=die_with_runner())
    finally:
        os.close(write_fd)
        os.close(log_fd)
    if not group_recorded(process, ctx):
        os.close(read_fd)
        process.stdin.close()
        return DISOWNED
    request = {"name": action.name, "target": action.target, "id": ctx.id,
               "params": ctx.params, "attempt": ctx.attempt, "log": str(job_log.path),
               "access": dataclasses.astuple(job_log.access)}
    try:
        process.stdin.write(json.dumps(request).encode())
        process.stdin.close()
    except BrokenPipeError:
        pass
    with os.fdopen(read_fd, "rb") as results:
        messages, code, peak_kb = _watch(process, results, ctx, grace, report_progress)
    if ctx.canceled:
        outcome = stopped_outcome(ctx.cancel_reason)
    elif messages:
        outcome = Outcome(Status(messages["status"]), output=messages.get("output"),
                          error=messages.get("error"), retry=messages.get("retry", True))
    else:
        outcome = Outcome(Status.FAILURE, error=f"child process exited with code {code} "
                                                "without an outcome")
    return Outcome(outcome.status, outcome.output, outcome.error, outcome.retry, peak_kb)


def _watch(process: subprocess.Popen, results, ctx: JobContext, grace: float,
           report_progress: ProgressCallback | None) -> tuple[dict, int, int]:
    """Read the child's messages until it exits, stopping it when asked.
    Returns (its outcome message, exit code, peak RSS in KiB)."""
    outcome: dict = {}
    buffer = b""
    stopped = False
    peak_kb = 0
    while True:
        ready, _, _ = select.select([results], [], [], 0.1)
        if ready:
            chunk = os.read(results.fileno(), 65536)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                outcome = _handle(json.loads(line), ctx, report_progress) or outcome
        peak_kb = max(peak_kb, _peak_rss_kb(process.pid))
        pid, status = os.waitpid(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
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


def _handle(message: dict, ctx: JobContext, report_progress: ProgressCallback | None):
    if "progress" in message and report_progress is not None:
        report_progress(ctx.id, *message["progress"])
        return None
    return message.get("outcome")


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
    send({"outcome": {"status": outcome.status.value, "output": outcome.output,
                      "error": outcome.error, "retry": outcome.retry,
                      "peak_rss_kb": _peak_rss_kb(os.getpid())}})
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1])))
