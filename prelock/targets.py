"""Target selection: the running processes to protect, and their tiers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prelock import procfs
from prelock.config import Config
from prelock.errors import AccessDenied, ProcessGone

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    pid: int
    comm: str
    exe: str
    cgroup: str
    tier: str  # "critical" or "others"
    reason: str  # why critical: "name", "exe" or "cgroup"; "others" for the second tier


def select_targets(config: Config, proc_root: str = "/proc",
                   exclude_pids: frozenset[int] = frozenset()) -> tuple[list[Target], int]:
    """Return the target processes, critical tier first, and how many could not be read.

    Kernel threads (no executable) are never targets, nor the pids in exclude_pids
    (the daemon passes its own pid). Processes that exit while being read are skipped.
    """
    targets = []
    denied = 0
    for pid in procfs.list_pids(proc_root):
        if pid in exclude_pids:
            continue
        try:
            target = _classify(config, pid, proc_root)
        except ProcessGone:
            log.debug("process %d exited while being read", pid)
            continue
        except AccessDenied as exc:
            log.debug("process %d skipped: %s", pid, exc)
            denied += 1
            continue
        if target is not None:
            log.debug("target %d (%s) tier=%s reason=%s exe=%s cgroup=%s", pid, target.comm, target.tier,
                      target.reason, target.exe, target.cgroup)
            targets.append(target)
    targets.sort(key=lambda t: (t.tier != "critical", t.pid))
    return targets, denied


def _classify(config: Config, pid: int, proc_root: str) -> Target | None:
    exe = procfs.read_exe(pid, proc_root)
    if exe is None:
        return None
    comm = procfs.read_comm(pid, proc_root)
    cgroup = procfs.memory_cgroup_path(procfs.read_cgroup(pid, proc_root))

    reason = config.critical.match(comm, exe, cgroup)
    if reason is not None:
        return Target(pid, comm, exe, cgroup, "critical", reason)
    if config.others:
        return Target(pid, comm, exe, cgroup, "others", "others")
    return None
