"""Inputs of `prelock doctor`: one read of the system-wide memory files, and rates between two reads.

read_snapshot records every file it could not use in Snapshot.sources instead of
raising. sample_rates reads vmstat and PSI a second time and turns the difference into
per-second rates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from prelock import sysmem

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One input file and, when it could not be used, why."""

    name: str
    path: str
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Rates:
    """Thrash signals over one sampling interval. A field is None when its source was unreadable."""

    interval_s: float
    refaults_file_per_s: float | None
    major_faults_per_s: float | None
    pages_scanned_per_s: float | None
    pages_stolen_per_s: float | None
    psi_percent: dict[str, float | None]


@dataclass
class Snapshot:
    """Values from one pass over procfs and sysfs. A field is empty or None when its file was unreadable."""

    sources: list[Source] = field(default_factory=list)
    meminfo: dict[str, int] | None = None
    vmstat: dict[str, int] | None = None
    slabs: list[sysmem.SlabCache] | None = None
    pressure: dict[str, sysmem.Pressure] = field(default_factory=dict)
    modules: list[sysmem.Module] | None = None
    swaps: list[sysmem.SwapArea] | None = None
    sysctls: dict[str, int] = field(default_factory=dict)
    lru_gen: sysmem.LruGen | None = None
    counters_read_at_s: float = 0.0


# Reading


def read_source(sources: list[Source], name: str, path: str, read: Callable[[], T]) -> T | None:
    """Run read() and record the source in sources. Return None for an unreadable or invalid file."""
    try:
        value = read()
    except FileNotFoundError:
        error = "not found"
    except PermissionError:
        error = "permission denied (run as root to read it)"
    except OSError as exc:
        error = f"read failed: {exc.strerror or exc}"
    except ValueError as exc:
        error = f"invalid content: {exc}"
    else:
        sources.append(Source(name, path))
        return value
    logger.debug("%s unavailable: %s: %s", name, path, error)
    sources.append(Source(name, path, error))
    return None


def read_snapshot(procfs_root: str = "/proc", sysfs_root: str = "/sys") -> Snapshot:
    """Read every system-wide memory file. Files that cannot be used are recorded in sources."""
    snap = Snapshot()
    sources = snap.sources
    snap.meminfo = read_source(sources, "meminfo", f"{procfs_root}/meminfo",
                               lambda: _require_memtotal(sysmem.read_meminfo(procfs_root)))
    _read_counters(snap, procfs_root)
    snap.slabs = read_source(sources, "slabinfo", f"{procfs_root}/slabinfo", lambda: sysmem.read_slabinfo(procfs_root))
    snap.modules = read_source(sources, "modules", f"{procfs_root}/modules", lambda: sysmem.read_modules(procfs_root))
    snap.swaps = read_source(sources, "swaps", f"{procfs_root}/swaps", lambda: sysmem.read_swaps(procfs_root))
    for name in sysmem.VM_SYSCTLS:
        value = read_source(sources, f"vm.{name}", f"{procfs_root}/sys/vm/{name}",
                            lambda: sysmem.read_vm_sysctl(name, procfs_root))
        if value is not None:
            snap.sysctls[name] = value
    snap.lru_gen = read_source(sources, "lru_gen", f"{sysfs_root}/kernel/mm/lru_gen",
                               lambda: sysmem.read_lru_gen(sysfs_root))
    return snap


def _read_counters(snap: Snapshot, procfs_root: str) -> None:
    """Read vmstat and PSI back to back and note when, for the rates."""
    snap.vmstat = read_source(snap.sources, "vmstat", f"{procfs_root}/vmstat", lambda: sysmem.read_vmstat(procfs_root))
    for resource in sysmem.PRESSURE_RESOURCES:
        pressure = read_source(snap.sources, f"pressure/{resource}", f"{procfs_root}/pressure/{resource}",
                               lambda: sysmem.read_pressure(resource, procfs_root))
        if pressure is not None:
            snap.pressure[resource] = pressure
    snap.counters_read_at_s = time.monotonic()


def meminfo_problem(procfs_root: str) -> str | None:
    """Return why procfs_root/meminfo gives no MemTotal (such as "not found"), or None when it does."""
    sources: list[Source] = []
    read_source(sources, "meminfo", f"{procfs_root}/meminfo",
                lambda: _require_memtotal(sysmem.read_meminfo(procfs_root)))
    return sources[0].error


def _require_memtotal(meminfo: dict[str, int]) -> dict[str, int]:
    if not meminfo.get("MemTotal"):
        raise ValueError("no MemTotal line")
    return meminfo


# Rates


def _counter_sums(vmstat: dict[str, int]) -> dict[str, int | None]:
    def total(*names: str) -> int | None:
        present = [vmstat[name] for name in names if name in vmstat]
        return sum(present) if present else None

    # Linux 5.9 split workingset_refault into _anon and _file.
    refaults = vmstat.get("workingset_refault_file", vmstat.get("workingset_refault"))
    return {
        "refaults_file": refaults,
        "major_faults": vmstat.get("pgmajfault"),
        # pgscan_anon/pgscan_file split the same events by type, so they are not added.
        "pages_scanned": total("pgscan_kswapd", "pgscan_direct", "pgscan_khugepaged", "pgscan_proactive"),
        "pages_stolen": total("pgsteal_kswapd", "pgsteal_direct", "pgsteal_khugepaged", "pgsteal_proactive"),
    }


def compute_rates(before: Snapshot, after: Snapshot, elapsed_s: float) -> Rates:
    """Compute per-second rates and PSI percentages between two snapshots."""
    first = _counter_sums(before.vmstat or {})
    second = _counter_sums(after.vmstat or {})

    def rate(name: str) -> float | None:
        if first[name] is None or second[name] is None or elapsed_s <= 0:
            return None
        return max(0, second[name] - first[name]) / elapsed_s

    psi: dict[str, float | None] = {}
    for resource in sysmem.PRESSURE_RESOURCES:
        for kind in ("some", "full"):
            psi[f"{resource}_{kind}"] = _psi_percent(before, after, resource, kind, elapsed_s)
    return Rates(elapsed_s, rate("refaults_file"), rate("major_faults"), rate("pages_scanned"),
                 rate("pages_stolen"), psi)


def _psi_percent(before: Snapshot, after: Snapshot, resource: str, kind: str, elapsed_s: float) -> float | None:
    """Return the share of the interval stalled, from the PSI total (microseconds)."""
    lines = [getattr(snap.pressure.get(resource), kind, None) for snap in (before, after)]
    if None in lines or elapsed_s <= 0:
        return None
    stalled_us = max(0, lines[1].total_us - lines[0].total_us)
    return min(100.0, stalled_us / (elapsed_s * 1e6) * 100.0)


def sample_rates(procfs_root: str, interval_s: float, first: Snapshot,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[Rates | None, str | None]:
    """Sleep interval_s after `first` was read, read the counters again, and return the rates.

    The second value is a note for the report when no rates were sampled.
    """
    if interval_s <= 0:
        return None, "not sampled (--interval 0), so the verdict uses the snapshot rules and PSI avg10"
    if first.vmstat is None and not first.pressure:
        return None, "not sampled: neither vmstat nor PSI is readable"
    sleep(interval_s)
    second = Snapshot()
    _read_counters(second, procfs_root)
    return compute_rates(first, second, second.counters_read_at_s - first.counters_read_at_s), None
