"""Memory cgroups, v1 and v2: find the controller, read usage, create limited children."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# cgroup v1 reports "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED_BYTES = 1 << 62


@dataclass(frozen=True)
class MemoryController:
    """Mount point and cgroup version of the memory controller."""

    version: int
    mount: Path

    def directory(self, cgroup_path: str) -> Path:
        return self.mount / cgroup_path.lstrip("/")


@dataclass(frozen=True)
class CgroupMemory:
    """Usage, limit (None when unlimited) and memory.stat of one cgroup, in bytes."""

    path: str
    usage_bytes: int
    limit_bytes: int | None
    stat: dict[str, int]
    oom_kills: int | None


def parse_mountinfo_memory(text: str) -> MemoryController | None:
    """Find the memory controller in /proc/self/mountinfo text.

    A v1 memory hierarchy wins over cgroup2 because on a hybrid layout the v2 mount
    has no memory controller.
    """
    v2_mount = None
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        mount_point = fields[4]
        fstype, super_options = fields[separator + 1], fields[separator + 3]
        if fstype == "cgroup" and "memory" in super_options.split(","):
            return MemoryController(1, Path(mount_point))
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = Path(mount_point)
    if v2_mount is not None and _v2_has_memory(v2_mount):
        return MemoryController(2, v2_mount)
    return None


def _v2_has_memory(mount: Path) -> bool:
    try:
        return "memory" in (mount / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def memory_controller(mountinfo: str = "/proc/self/mountinfo") -> MemoryController | None:
    """Return this machine's memory controller, or None when it is not mounted."""
    try:
        with open(mountinfo) as f:
            return parse_mountinfo_memory(f.read())
    except OSError:
        return None


def find_memory_controller(sysfs_root: str = "/sys") -> MemoryController | None:
    """Find the memory controller under <sysfs_root>/fs/cgroup, v1 first.

    A v1 memory hierarchy wins because on a hybrid layout the v2 mount has no memory
    controller. Only the standard mount points are probed, so fixture trees work.
    """
    base = Path(sysfs_root, "fs", "cgroup")
    if (base / "memory" / "memory.usage_in_bytes").is_file():
        return MemoryController(1, base / "memory")
    try:
        controllers = (base / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    return MemoryController(2, base) if "memory" in controllers else None


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse 'key value' lines such as memory.stat, memory.events and memory.oom_control."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def parse_limit(text: str, version: int) -> int | None:
    value = text.strip()
    if value == "max":
        return None
    limit = int(value)
    if version == 1 and limit >= _V1_UNLIMITED_BYTES:
        return None
    return limit


def read_memory(controller: MemoryController, cgroup_path: str) -> CgroupMemory | None:
    """Read usage, limit and stat of cgroup_path; None when the cgroup does not exist."""
    directory = controller.directory(cgroup_path)
    if controller.version == 1:
        names = ("memory.usage_in_bytes", "memory.limit_in_bytes", "memory.oom_control")
    else:
        names = ("memory.current", "memory.max", "memory.events")
    try:
        usage_bytes = int((directory / names[0]).read_text())
        limit_bytes = parse_limit((directory / names[1]).read_text(), controller.version)
        stat = parse_flat_keyed((directory / "memory.stat").read_text())
    except FileNotFoundError:
        return None
    try:
        oom_kills = parse_flat_keyed((directory / names[2]).read_text()).get("oom_kill")
    except OSError:
        oom_kills = None
    return CgroupMemory(cgroup_path, usage_bytes, limit_bytes, stat, oom_kills)


def effective_limit_bytes(controller: MemoryController, cgroup_path: str) -> int | None:
    """Return the smallest memory limit on the path from cgroup_path up to the root."""
    limits = []
    path = cgroup_path
    while True:
        memory = read_memory(controller, path)
        if memory is not None and memory.limit_bytes is not None:
            limits.append(memory.limit_bytes)
        if path in ("", "/"):
            break
        path = os.path.dirname(path.rstrip("/")) or "/"
    return min(limits) if limits else None


# The write side: child cgroups with a memory limit, for `prelock bench`.

def create_memory_cgroup(controller: MemoryController, parent_path: str, name: str,
                         limit_bytes: int) -> str:
    """Create cgroup parent_path/name with a memory limit and no swap; return its path.

    In v2 the parent must list memory in cgroup.subtree_control before a child gets
    memory.max, so it is enabled there when missing. The caller must be root.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid cgroup name {name!r}: expected one path component")
    cgroup_path = f"{parent_path.rstrip('/')}/{name}"
    directory = controller.directory(cgroup_path)

    if controller.version == 2:
        _enable_v2_memory(controller.directory(parent_path))
    directory.mkdir()
    try:
        _write_limits(controller, directory, limit_bytes)
    except OSError:
        directory.rmdir()
        raise
    return cgroup_path


# NOTE: no test has run the v2 write side (subtree_control, memory.max, memory.swap.max),
# because the test machines mount the memory controller on cgroup v1.
def _enable_v2_memory(parent: Path) -> None:
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    if "memory" not in enabled:
        (parent / "cgroup.subtree_control").write_text("+memory")


def _write_limits(controller: MemoryController, directory: Path, limit_bytes: int) -> None:
    if controller.version == 1:
        (directory / "memory.limit_in_bytes").write_text(str(limit_bytes))
        # memory.memsw.* exists only when the kernel accounts swap; the limit on memory plus
        # swap must not be below memory.limit_in_bytes, so it is written second.
        memsw = directory / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(limit_bytes))
    else:
        (directory / "memory.max").write_text(str(limit_bytes))
        swap_max = directory / "memory.swap.max"
        if swap_max.exists():
            swap_max.write_text("0")


def add_process(controller: MemoryController, cgroup_path: str, pid: int) -> None:
    """Move pid (all its threads) into the cgroup; later allocations are charged there."""
    (controller.directory(cgroup_path) / "cgroup.procs").write_text(str(pid))


def list_processes(controller: MemoryController, cgroup_path: str) -> list[int]:
    """Return the PIDs in the cgroup; an empty list when the cgroup does not exist."""
    try:
        text = (controller.directory(cgroup_path) / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def remove_cgroup(controller: MemoryController, cgroup_path: str, timeout_s: float = 5.0) -> None:
    """Remove an empty cgroup, waiting up to timeout_s for exiting processes to leave it.

    A process that was killed stays listed until it is reaped, and rmdir fails with
    EBUSY meanwhile. Raises OSError naming the cgroup and its remaining PIDs on timeout;
    a cgroup that is already gone is not an error.
    """
    directory = controller.directory(cgroup_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                pids = list_processes(controller, cgroup_path)
                raise OSError(exc.errno, f"cannot remove cgroup {cgroup_path} "
                              f"(processes left: {pids or 'none'}): {exc.strerror}",
                              str(directory)) from exc
        time.sleep(0.05)


@contextlib.contextmanager
def memory_cgroup(controller: MemoryController, parent_path: str, name: str,
                  limit_bytes: int, timeout_s: float = 5.0) -> Iterator[str]:
    """Create a limited child cgroup for the with-block and remove it afterwards.

    The caller must end the processes it put there before the block exits; removal
    waits up to timeout_s for them to be reaped.
    """
    cgroup_path = create_memory_cgroup(controller, parent_path, name, limit_bytes)
    try:
        yield cgroup_path
    finally:
        remove_cgroup(controller, cgroup_path, timeout_s)
