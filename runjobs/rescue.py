"""Dead runners: find them, and give their jobs back or an honest end.

A runner is dead when its heartbeat is older than `heartbeat_timeout` on the
database's clock, or at once when it ran on this host, in this boot, and its
pid no longer exists (a pid that exists may be reused: then the heartbeat
decides, so a living runner is never declared dead). A runner of this host
from an earlier boot is dead too: the host restarted.

A dead runner's command may still run: in its own session, it outlives a
SIGKILL of the runner (the parent-death signal ends its leader, not what the
leader started), and a runner that is only frozen (SIGSTOP) is declared dead
by its heartbeat while its commands go on. So the retry of a job whose
process group the runner recorded is held back by `grace_period`, and a
rescuer on the group's node and boot kills what is left of the group
(`groups.kill_group`) and then lets the retry start at once. A rescuer on
another host cannot: the retry starts when the hold ends, heartbeat_timeout
+ grace_period after the last heartbeat, or sooner when a runner of the dead
runner's node has killed the group.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from .config import Settings
from .groups import kill_group, marker
from .models import LIVE_RUNNER_STATES, RunnerState
from .store import RunnerRow, Store

log = logging.getLogger("runjobs.rescue")


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Death(NamedTuple):
    reason: str
    host_restarted: bool = False
    by_heartbeat: bool = False    # re-checked when the rescue is written


def death_reason(runner: RunnerRow, settings: Settings, my_boot: str | None) -> Death | None:
    """Why `runner` is dead, or None if it may be alive."""
    where = f"runner {runner.id} (node {runner.node}, pid {runner.pid})"
    if runner.node == settings.node and my_boot and runner.boot_id:
        if runner.boot_id != my_boot:
            return Death(f"{where} died with its host's restart", host_restarted=True)
        if runner.pid != os.getpid() and not pid_exists(runner.pid):
            return Death(f"{where} died")
    if runner.heartbeat_age > settings.heartbeat_timeout:
        return Death(f"{where} died (no heartbeat for {runner.heartbeat_age:.0f}s)",
                     by_heartbeat=True)
    return None


def runner_state(runner: RunnerRow, settings: Settings, my_boot: str | None) -> RunnerState:
    """The state to show for `runner`: its row's, or dead when its row says
    it may hold jobs but `death_reason` finds it gone. The one place that
    decides it, for `runners` and everything else that shows runners."""
    state = RunnerState(runner.state)
    if state.value in LIVE_RUNNER_STATES and death_reason(runner, settings, my_boot):
        return RunnerState.DEAD
    return state


def rescue_once(store: Store, settings: Settings, my_boot: str | None,
                my_runner_id: int | None = None) -> int:
    """Rescue every dead runner's jobs; returns how many jobs were touched."""
    touched = 0
    for runner in store.runners_alive():
        if runner.id == my_runner_id:
            continue
        death = death_reason(runner, settings, my_boot)
        if death is None:
            continue
        reason = death.reason
        # A host that restarted took every job down: no job is to blame.
        count_crash = not death.host_restarted and not _host_rebooted(store, runner)
        result = store.runner_rescue(
            runner.id, reason, settings.crash_limit, count_crash,
            stale_after=settings.heartbeat_timeout if death.by_heartbeat else None,
            hold_groups=None if death.host_restarted else settings.grace_period)
        if result is None:
            continue  # another runner got there first
        touched += sum(len(ids) for ids in result.values())
        log.warning("%s: jobs requeued %s, retried %s, canceled %s, abandoned %s", reason,
                    result["requeued"], result["retried"], result["canceled"], result["abandoned"])
    kill_orphan_groups(store, settings, my_boot)
    return touched


def kill_orphan_groups(store: Store, settings: Settings, my_boot: str | None) -> int:
    """Kill what is left of the process groups that dead runners of this
    node recorded, and let the jobs' held retries start. A group of an
    earlier boot is gone with it. Returns how many groups were cleared; a
    group whose processes do not end stays, and its retry waits out its
    hold."""
    cleared = 0
    for job_id, pgid, runner_id, boot in store.process_groups_of_dead(settings.node):
        if my_boot is None or boot is None:
            continue  # which boot it ran in is not known: nothing is provably ours
        if boot == my_boot and not kill_group(pgid, marker(runner_id, job_id)):
            log.error("job %s: process group %s of dead runner %s does not end; its retry "
                      "waits out its hold", job_id, pgid, runner_id)
            continue
        cleared += store.process_group_cleared(job_id, runner_id)
    return cleared


def _host_rebooted(store: Store, runner: RunnerRow) -> bool:
    newest = store.node_boot_ids(runner.node)
    return bool(newest and runner.boot_id and newest != runner.boot_id)
