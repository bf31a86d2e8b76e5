"""Callables the tests register as actions (importable as tests.sample_actions
with the repository on PYTHONPATH, which the fixtures set)."""

import os
import time

_leaked = []


def append_id(ctx):
    """Appends the job id to the file named by param `path`, one line per run."""
    with open(ctx.params["path"], "a") as handle:
        handle.write(f"{ctx.id}\n")


def record_start(ctx):
    """Appends 'id monotonic-ns' when it starts, then sleeps `seconds`."""
    with open(ctx.params["path"], "a") as handle:
        handle.write(f"{ctx.id} {time.time_ns()}\n")
    ctx.wait(float(ctx.params.get("seconds", 0)))


def leak(ctx):
    """Leaks `mb` megabytes (default 30) into a module global, as a buggy action would."""
    block = bytearray(int(ctx.params.get("mb", 30)) * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: real RSS
    _leaked.append(block)


def returns(ctx):
    """Returns ctx.params['value'] (lists become tuples), to test outcome mapping."""
    value = ctx.params.get("value")
    return tuple(value) if isinstance(value, list) else value


def loop_forever(ctx):
    """A Python busy loop that never checks for cancel."""
    while True:
        pass


def pid_file(ctx):
    with open(ctx.params["path"], "w") as handle:
        handle.write(str(os.getpid()))


def ignore_stops(ctx):
    """Catches every stop and carries on: a job that cannot be stopped."""
    deadline = time.monotonic() + float(ctx.params.get("seconds", 60))
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:
            pass


def spawn_child_and_wait(ctx):
    """Starts a child process that sleeps, records both pids, and waits for it
    without ever checking for a cancel (as a careless command wrapper would)."""
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    with open(ctx.params["path"], "w") as handle:
        handle.write(f"{os.getpid()} {child.pid}\n")
    child.wait()


def sleep_in_c(ctx):
    """time.sleep in C with SIGTERM ignored: only a hard kill stops it."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(ctx.params["path"], "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(float(ctx.params.get("seconds", 60)))


def refuse_retry(ctx):
    """Fails with DoNotRetry: no retry, whatever `--retries` says."""
    from runjobs import DoNotRetry

    raise DoNotRetry(f"job {ctx.id} refuses, attempt {ctx.attempt}")


def log_lines(ctx):
    """Writes `lines` lines (default 20,000) of about 100 bytes to the job's log."""
    for number in range(int(ctx.params.get("lines", 20000))):
        ctx.log.info("line %d of a job that logs a lot %s", number, "x" * 60)


def print_lines(ctx):
    """Prints `lines` lines (default 20,000) to stdout, as a careless action would."""
    for number in range(int(ctx.params.get("lines", 20000))):
        print(f"line {number} printed by a job {'x' * 60}")


def ticker(ctx):
    """Appends 'attempt pid time' every 0.05 s, `steps` times (counted, not
    timed: a job frozen with its runner goes on where it stopped)."""
    for _ in range(int(ctx.params.get("steps", 100))):
        with open(ctx.params["path"], "a") as handle:
            handle.write(f"{ctx.attempt} {os.getpid()} {time.time()}\n")
        ctx.wait(0.05)


def exclusive_copy(lock_path: str, out_path: str, seconds: float) -> None:
    """One copy of a job's work: holds an exclusive flock on `lock_path`
    while it runs, and appends to `out_path` 'start PID TIME', 'end PID
    TIME', or 'overlap PID TIME' when another copy still held the lock."""
    import fcntl

    def record(what: str) -> None:
        with open(out_path, "a") as handle:
            handle.write(f"{what} {os.getpid()} {time.time()}\n")

    lock = open(lock_path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        record("overlap")
        fcntl.flock(lock, fcntl.LOCK_EX)
    record("start")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    record("end")


if __name__ == "__main__":  # a command's work: python sample_actions.py LOCK OUT SECONDS
    import sys

    exclusive_copy(sys.argv[1], sys.argv[2], float(sys.argv[3]))
