"""Privileges of this process: capabilities from /proc/self/status and RLIMIT_MEMLOCK."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

CAP_DAC_READ_SEARCH = 2
CAP_IPC_LOCK = 14
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_CHECKPOINT_RESTORE = 40

# Below this RLIMIT_MEMLOCK there is nothing useful to lock, so the daemon refuses to start.
MIN_MEMLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Privilege:
    effective_caps: int
    memlock_limit_bytes: int | None  # None: unlimited

    def has(self, cap: int) -> bool:
        return bool(self.effective_caps >> cap & 1)

    @property
    def can_lock_unlimited(self) -> bool:
        """CAP_IPC_LOCK lifts RLIMIT_MEMLOCK; so does an infinite limit."""
        return self.has(CAP_IPC_LOCK) or self.memlock_limit_bytes is None

    @property
    def can_open_map_files(self) -> bool:
        return self.has(CAP_SYS_ADMIN) or self.has(CAP_CHECKPOINT_RESTORE)


def parse_cap_eff(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def current() -> Privilege:
    with open("/proc/self/status") as f:
        caps = parse_cap_eff(f.read())
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return Privilege(caps, None if soft == resource.RLIM_INFINITY else soft)


def is_root() -> bool:
    return os.geteuid() == 0
