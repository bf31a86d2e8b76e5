"""A command's process group must not outlive its runner.

Commands (and callables with `isolation = "process"`) run in a session of
their own, so that a stop reaches every process they start; for the same
reason a SIGKILL of the runner's own process group does not reach them. Two
things end them when their runner is gone:

- The kernel's parent-death signal (PR_SET_PDEATHSIG, SIGKILL), set in the
  child between fork and exec. It is sent when the *thread* that forked the
  child ends, not the process: runjobs starts each child from a job worker
  thread that waits for it and lives for the whole cycle (`jobthreads._Workers`),
  so the two ends coincide. It reaches the group's leader only: processes the
  command started itself live on in its group.
- A rescuer on the same node (same boot) kills what is left of the group the
  runner recorded (`jobs.pgid`) before the job's retry may start
  (`kill_group`). It kills only processes it can prove are that job's: each
  carries `RUNJOBS_GROUP=<runner id>.<job id>` in its environment, which no
  other process on the host has (runner ids are never reused), and each is
  signalled through a pidfd opened before its environment was read, so a pid
  reused meanwhile is never signalled.

Why `preexec_fn` and not a re-exec wrapper: the child must set the signal
itself, between fork and exec. A wrapper program (`python -c`, then exec)
cost 45 ms per command start here, against 2.5 ms for a plain start, and
turns "no such file" into an exit code; util-linux's `setpriv --pdeathsig`
is not on every host. `preexec_fn` forks instead of vforking (about 15 ms
with an 80 MB heap) and runs Python in the child of a threaded
process, where any lock another thread held at the fork stays locked: so
`_die_with_runner` takes none. It calls a `prctl` resolved beforehand and
`os.getppid()`, imports nothing and logs nothing (CPython's own at-fork
hooks, which run first, reinitialise its locks). Callables in threads, the
hot path, start no process and pay nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import time
from typing import Callable

log = logging.getLogger("runjobs.groups")

MARKER = "RUNJOBS_GROUP"
PR_SET_PDEATHSIG = 1

_prctl: Callable[..., int] | None = None


def marker(runner_id: int, job_id: int) -> str:
    """The value of RUNJOBS_GROUP in the processes of one job's attempt."""
    return f"{runner_id}.{job_id}"


def child_environment(runner_id: int | None, job_id: int) -> dict[str, str] | None:
    """The environment of the job's child: the runner's, plus the marker
    (None: the runner's unchanged, no runner id to mark it with)."""
    if runner_id is None:
        return None
    return {**os.environ, MARKER: marker(runner_id, job_id)}


def die_with_runner() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child die with the thread that forks
    it; None where prctl is missing (not Linux)."""
    global _prctl
    if _prctl is None:
        try:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
    parent = os.getpid()
    return lambda: _die_with_runner(parent)


def _die_with_runner(parent: int) -> None:
    """In the child, before exec: no locks, no imports (see the module's
    docstring). The runner may have died before prctl: then the child is
    someone else's already, and it dies at once."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


# -- the rescuer's side -------------------------------------------------------------


def kill_group(pgid: int, mark: str, wait: float = 2.0) -> bool:
    """SIGKILL every process of group `pgid` that carries `mark`; wait up
    to `wait` seconds for them to end. True when none of them is left; a
    process of the group without the mark (not ours) is never touched."""
    pidfds = []
    try:
        for pid in _members(pgid):
            pidfd = _ours(pid, mark)
            if pidfd is not None:
                pidfds.append(pidfd)
                _kill(pidfd)
        if pidfds:
            log.warning("process group %s (%s=%s): %d process(es) of a dead runner's job "
                        "killed", pgid, MARKER, mark, len(pidfds))
        return _gone(pidfds, wait)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def _members(pgid: int) -> list[int]:
    """The pids whose process group is `pgid` (from /proc)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # ended meanwhile
        # After the command name, which may hold spaces and parentheses:
        # state, ppid, pgrp.
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid:
            members.append(int(name))
    return members


def _ours(pid: int, mark: str) -> int | None:
    """A pidfd of `pid` if it carries `mark`, else None. The pidfd is
    opened first: if the process still runs after its environment was read,
    that environment was its own. Without pidfds (a kernel before 5.3)
    nothing is provably ours: the retry then waits out its hold."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None  # ended, or no pidfds
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read().split(b"\0")
    except OSError:
        environ = []  # ended, or not readable by us: not provably ours
    if f"{MARKER}={mark}".encode() in environ and not _ended(pidfd):
        return pidfd
    os.close(pidfd)
    return None


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ended(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def _gone(pidfds: list[int], wait: float) -> bool:
    """Whether every process behind `pidfds` ended within `wait` seconds
    (a pidfd turns readable when its process ends)."""
    deadline = time.monotonic() + wait
    left = list(pidfds)
    while left:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return False
        ready, _, _ = select.select(left, [], [], timeout)
        left = [fd for fd in left if fd not in ready]
    return True
