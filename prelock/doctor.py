"""Analysis behind `prelock doctor`: memory breakdown, thrash verdict and recommendations.

`collect` reads procfs and sysfs once (twice for the rates, `interval_s` apart) and
returns a Report of plain records. The analysis steps (breakdown, holders, rates,
verdict, recommendations) are pure functions of what was read, so tests feed them
fixture trees. Nothing here prints: prelock.cli.doctor renders the records.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import yaml

from prelock import cgroupfs, native, pagecache, procfs, sysmem
from prelock.errors import AccessDenied, ProcessGone, translate_proc_error
from prelock.files import FileSkipped

logger = logging.getLogger(__name__)

T = TypeVar("T")

GIB = 1 << 30

# Verdicts from least to most severe. The report takes the most severe one whose rule fired.
HEALTHY = "healthy"
UNDER_PRESSURE = "under pressure"
THRASHING_RISK = "thrashing risk"
THRASHING = "thrashing"
UNKNOWN = "unknown"
SEVERITY = (HEALTHY, UNDER_PRESSURE, THRASHING_RISK, THRASHING)

# NOTE: these thresholds are starting points chosen from the livelock this tool was
# built for, not calibrated on a fleet. Each rule prints them with what it observed.
AVAILABLE_LOW_FRACTION = 0.10
UNACCOUNTED_RISK_FRACTION = 0.25
FILE_LRU_TO_MAPPED_RATIO = 2.0
PSI_SOME_PRESSURE_PERCENT = 10.0
PSI_FULL_THRASHING_PERCENT = 10.0
REFAULTS_PRESSURE_PER_S = 100.0
REFAULTS_THRASHING_PER_S = 1000.0
MAJOR_FAULTS_THRASHING_PER_S = 100.0
IO_FULL_THRASHING_PERCENT = 10.0
# Unaccounted memory above this share of MemTotal is worth attributing to a driver.
DRIVER_MEMORY_FRACTION = 0.10

STATE_DIRS = ("/run/prelock", "/var/lib/prelock")
STATUS_FILE = "status.json"
EARLY_OOM_DAEMONS = ("earlyoom", "systemd-oomd", "oomd", "nohang")
# Memory cgroups of the node agents and of the pods, for the systemd and cgroupfs drivers.
CGROUP_NAMES = ("kubepods.slice", "kubepods", "system.slice")

# Modules of GPUs and accelerators, with the device files their users hold open.
ACCELERATOR_MODULES = {
    "nvidia": ("NVIDIA GPU driver", "/dev/nvidia*"),
    "nvidia_uvm": ("NVIDIA unified memory", "/dev/nvidia-uvm*"),
    "nvidia_drm": ("NVIDIA DRM", "/dev/dri/*"),
    "nvidia_modeset": ("NVIDIA mode setting", "/dev/nvidia-modeset"),
    "nvidia_peermem": ("NVIDIA GPUDirect RDMA", "/dev/nvidia*"),
    "nouveau": ("NVIDIA GPU (nouveau)", "/dev/dri/*"),
    "amdgpu": ("AMD GPU", "/dev/dri/* /dev/kfd"),
    "radeon": ("AMD GPU (radeon)", "/dev/dri/*"),
    "i915": ("Intel GPU", "/dev/dri/*"),
    "xe": ("Intel GPU (xe)", "/dev/dri/*"),
    "habanalabs": ("Intel Gaudi accelerator", "/dev/accel/* /dev/hl*"),
    "ivpu": ("Intel NPU", "/dev/accel/*"),
    "amdxdna": ("AMD NPU", "/dev/accel/*"),
    "qaic": ("Qualcomm Cloud AI accelerator", "/dev/accel/*"),
    "neuron": ("AWS Inferentia/Trainium", "/dev/neuron*"),
    "apex": ("Google Edge TPU", "/dev/apex_*"),
}

# Slab caches with one object per page that a driver allocated with alloc_pages, which
# no meminfo field counts. The NVIDIA driver's cache name can carry a numeric suffix, as
# in nvidia_pte_cache-2782818403.
PAGE_TRACKING_SLABS = {
    "nvidia_pte_cache": ("NVIDIA GPU driver: one object per system-memory page it allocated", "/dev/nvidia*"),
}


# Records


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
class Category:
    """A share of MemTotal, computed from the meminfo fields named in `formula`."""

    key: str
    label: str
    size_bytes: int
    formula: str


@dataclass(frozen=True)
class Breakdown:
    """MemTotal split into categories that do not overlap, plus what no category explains.

    `details` are meminfo values that lie inside the categories (or outside MemTotal).
    They are shown for context and never summed.
    """

    total_bytes: int
    available_bytes: int | None
    categories: tuple[Category, ...]
    unaccounted_bytes: int
    details: tuple[Category, ...]


@dataclass(frozen=True)
class Holder:
    """A likely holder of unaccounted memory, with an estimate where one can be made."""

    kind: str
    name: str
    description: str
    estimate_bytes: int | None
    method: str
    device_files: str | None = None


@dataclass(frozen=True)
class SlabUsage:
    name: str
    size_bytes: int
    active_objects: int
    object_size_bytes: int


@dataclass(frozen=True)
class Rates:
    """Thrash signals over one sampling interval. A field is None when its source was unreadable."""

    interval_s: float
    refaults_file_per_s: float | None
    major_faults_per_s: float | None
    pages_scanned_per_s: float | None
    pages_stolen_per_s: float | None
    psi_percent: dict[str, float | None]


@dataclass(frozen=True)
class Rule:
    """One verdict rule: the condition with its thresholds, and what was observed."""

    key: str
    verdict: str
    condition: str
    observed: str
    fired: bool


@dataclass(frozen=True)
class Verdict:
    """The verdict, the rules behind it, and a note on where the pressure comes from."""

    state: str
    rules: tuple[Rule, ...]
    note: str | None = None


@dataclass(frozen=True)
class CgroupUsage:
    name: str
    path: str
    usage_bytes: int
    limit_bytes: int | None
    anon_bytes: int | None
    file_bytes: int | None
    kernel_bytes: int | None


@dataclass(frozen=True)
class CgroupState:
    version: int | None
    mount: str | None
    groups: tuple[CgroupUsage, ...]
    note: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    comm: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class StatusFile:
    path: str
    pid: int | None
    locked_bytes: int | None
    age_s: float | None
    error: str | None = None


@dataclass(frozen=True)
class KubeletState:
    """The running kubelet, how much of its executable is in the page cache, and its reserves."""

    pid: int | None
    exe: str | None
    size_bytes: int | None
    cached_bytes: int | None
    method: str | None
    note: str | None
    system_reserved_memory: str | None = None
    eviction_hard_memory: str | None = None


@dataclass(frozen=True)
class Protection:
    daemon_pids: tuple[int, ...]
    status_files: tuple[StatusFile, ...]
    status_note: str | None
    mlocked_bytes: int | None
    kubelet: KubeletState
    early_oom: tuple[ProcessInfo, ...]


@dataclass(frozen=True)
class Recommendation:
    """One change to make: why, the exact commands or settings, and a note on applying them."""

    key: str
    title: str
    reason: str
    commands: tuple[str, ...]
    note: str | None = None


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


@dataclass(frozen=True)
class Report:
    procfs: str
    sysfs: str
    page_size: int
    snapshot: Snapshot
    breakdown: Breakdown | None
    holders: tuple[Holder, ...]
    top_slabs: tuple[SlabUsage, ...]
    rates: Rates | None
    rates_note: str | None
    cgroups: CgroupState
    protection: Protection
    verdict: Verdict
    recommendations: tuple[Recommendation, ...]


# Reading


def _attempt(sources: list[Source], name: str, path: str, read: Callable[[], T]) -> T | None:
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
    snap.meminfo = _attempt(sources, "meminfo", f"{procfs_root}/meminfo",
                            lambda: _require_memtotal(sysmem.read_meminfo(procfs_root)))
    _read_counters(snap, procfs_root)
    snap.slabs = _attempt(sources, "slabinfo", f"{procfs_root}/slabinfo", lambda: sysmem.read_slabinfo(procfs_root))
    snap.modules = _attempt(sources, "modules", f"{procfs_root}/modules", lambda: sysmem.read_modules(procfs_root))
    snap.swaps = _attempt(sources, "swaps", f"{procfs_root}/swaps", lambda: sysmem.read_swaps(procfs_root))
    for name in sysmem.VM_SYSCTLS:
        value = _attempt(sources, f"vm.{name}", f"{procfs_root}/sys/vm/{name}",
                         lambda: sysmem.read_vm_sysctl(name, procfs_root))
        if value is not None:
            snap.sysctls[name] = value
    snap.lru_gen = _attempt(sources, "lru_gen", f"{sysfs_root}/kernel/mm/lru_gen",
                            lambda: sysmem.read_lru_gen(sysfs_root))
    return snap


def _read_counters(snap: Snapshot, procfs_root: str) -> None:
    """Read vmstat and PSI back to back and note when, for the rates."""
    snap.vmstat = _attempt(snap.sources, "vmstat", f"{procfs_root}/vmstat", lambda: sysmem.read_vmstat(procfs_root))
    for resource in sysmem.PRESSURE_RESOURCES:
        pressure = _attempt(snap.sources, f"pressure/{resource}", f"{procfs_root}/pressure/{resource}",
                            lambda: sysmem.read_pressure(resource, procfs_root))
        if pressure is not None:
            snap.pressure[resource] = pressure
    snap.counters_read_at_s = time.monotonic()


def _require_memtotal(meminfo: dict[str, int]) -> dict[str, int]:
    if not meminfo.get("MemTotal"):
        raise ValueError("no MemTotal line")
    return meminfo


# Breakdown


def build_breakdown(meminfo: dict[str, int]) -> Breakdown:
    """Split MemTotal into meminfo categories that do not overlap.

    Cached includes Shmem, so the page cache is shown as Cached - Shmem plus Shmem.
    On x86_64 and arm64 kernels built with CONFIG_VMAP_STACK (the default), thread
    stacks come from vmalloc and are in both KernelStack and VmallocUsed, so vmalloc
    counts VmallocUsed - KernelStack. VmallocUsed counts only pages vmalloc allocated,
    not ioremap ranges, since Linux 5.3. A kernel that prints 0 there leaves vmalloc
    memory in the unaccounted remainder. SwapCached pages that a process maps are also
    in AnonPages, so with swap in use the sum can count them twice and understate the
    unaccounted remainder by up to SwapCached.
    """
    categories = tuple(_categories(meminfo))
    accounted = sum(category.size_bytes for category in categories)
    total = meminfo["MemTotal"]
    return Breakdown(total, meminfo.get("MemAvailable"), categories, total - accounted, tuple(_details(meminfo)))


def _categories(m: dict[str, int]) -> list[Category]:
    rows: list[Category] = []

    def add(key: str, label: str, formula: str, *fields: str, value: int | None = None) -> None:
        if all(name in m for name in fields):
            rows.append(Category(key, label, max(0, value if value is not None else m[fields[0]]), formula))

    add("free", "free", "MemFree", "MemFree")
    add("page_cache_file", "page cache, file-backed", "Cached - Shmem", "Cached",
        value=m.get("Cached", 0) - m.get("Shmem", 0))
    add("shmem", "page cache, shmem and tmpfs", "Shmem", "Shmem")
    add("buffers", "buffers (block device cache)", "Buffers", "Buffers")
    add("swap_cache", "swap cache", "SwapCached", "SwapCached")
    add("anon", "anonymous (process memory)", "AnonPages", "AnonPages")
    add("slab_reclaimable", "slab, reclaimable", "SReclaimable", "SReclaimable")
    add("slab_unreclaimable", "slab, unreclaimable", "SUnreclaim", "SUnreclaim")
    add("kernel_reclaimable_other", "other reclaimable kernel memory", "KReclaimable - SReclaimable",
        "KReclaimable", "SReclaimable", value=m.get("KReclaimable", 0) - m.get("SReclaimable", 0))
    add("kernel_stack", "kernel stacks", "KernelStack", "KernelStack")
    add("page_tables", "page tables", "PageTables", "PageTables")
    add("secondary_page_tables", "secondary page tables (KVM, IOMMU)", "SecPageTables", "SecPageTables")
    add("percpu", "per-CPU allocations", "Percpu", "Percpu")
    add("vmalloc", "vmalloc, without kernel stacks", "VmallocUsed - KernelStack", "VmallocUsed",
        value=m.get("VmallocUsed", 0) - m.get("KernelStack", 0))
    if "Hugetlb" in m:
        add("hugetlb", "hugetlb pool", "Hugetlb", "Hugetlb")
    else:
        add("hugetlb", "hugetlb pool", "HugePages_Total * Hugepagesize", "HugePages_Total", "Hugepagesize",
            value=m.get("HugePages_Total", 0) * m.get("Hugepagesize", 0))
    add("zswap", "zswap compressed pool", "Zswap", "Zswap")
    add("gpu_active", "GPU driver, in use", "GPUActive", "GPUActive")
    add("gpu_reclaim", "GPU driver pools, reclaimable", "GPUReclaim", "GPUReclaim")
    add("hardware_corrupted", "hardware corrupted (poisoned)", "HardwareCorrupted", "HardwareCorrupted")
    return rows


def _details(m: dict[str, int]) -> list[Category]:
    rows: list[Category] = []

    def add(key: str, label: str, formula: str, value: int | None) -> None:
        if value is not None:
            rows.append(Category(key, label, value, formula))

    add("available", "available (estimate)", "MemAvailable", m.get("MemAvailable"))
    add("file_lru", "file LRU, in page cache", "Active(file) + Inactive(file)", file_lru_bytes(m))
    add("mapped", "mapped by processes, in page cache", "Mapped", m.get("Mapped"))
    add("anon_thp", "transparent huge pages, in anonymous", "AnonHugePages", m.get("AnonHugePages"))
    add("mlocked", "mlocked, in the categories above", "Mlocked", m.get("Mlocked"))
    add("unevictable", "unevictable, in the categories above", "Unevictable", m.get("Unevictable"))
    add("dirty", "dirty, in page cache", "Dirty", m.get("Dirty"))
    add("unaccepted", "not yet accepted by the guest, in free", "Unaccepted", m.get("Unaccepted"))
    add("balloon", "balloon driver, may be outside MemTotal", "Balloon", m.get("Balloon"))
    return rows


def file_lru_bytes(meminfo: dict[str, int]) -> int | None:
    if "Active(file)" not in meminfo or "Inactive(file)" not in meminfo:
        return None
    return meminfo["Active(file)"] + meminfo["Inactive(file)"]


# Holders of unaccounted memory


def find_holders(modules: list[sysmem.Module] | None, slabs: list[sysmem.SlabCache] | None,
                 meminfo: dict[str, int] | None, page_size: int) -> list[Holder]:
    """List loaded accelerator drivers, page-tracking slabs and balloon memory.

    The size of a module in /proc/modules does not include the pages it allocates, so
    modules get no estimate. A page-tracking slab gets active objects x page size.
    """
    holders = []
    for slab in slabs or ():
        for prefix, (description, device_files) in PAGE_TRACKING_SLABS.items():
            if slab.name.startswith(prefix):
                method = (f"{slab.active_objects:,} active objects x {page_size}-byte page "
                          f"(the slab itself uses {slab.size_bytes(page_size) / GIB:.2f} GiB)")
                holders.append(Holder("slab", slab.name, description, slab.active_objects * page_size, method,
                                      device_files))
    for module in modules or ():
        if module.name in ACCELERATOR_MODULES:
            description, device_files = ACCELERATOR_MODULES[module.name]
            method = (f"module loaded ({module.size_bytes:,} bytes of code and static data). "
                      "The pages it allocates are counted in no meminfo field.")
            holders.append(Holder("module", module.name, description, None, method, device_files))
    if meminfo and meminfo.get("Balloon"):
        holders.append(Holder("meminfo", "Balloon", "virtual machine balloon driver", meminfo["Balloon"],
                              "meminfo Balloon. Drivers that take these pages out of MemTotal instead leave "
                              "none of them in the unaccounted memory."))
    return holders


def top_slabs(slabs: list[sysmem.SlabCache] | None, page_size: int, count: int = 5) -> list[SlabUsage]:
    usage = [SlabUsage(slab.name, slab.size_bytes(page_size), slab.active_objects, slab.object_size_bytes)
             for slab in slabs or ()]
    return sorted(usage, key=lambda item: item.size_bytes, reverse=True)[:count]


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


# Verdict


def judge(breakdown: Breakdown | None, meminfo: dict[str, int] | None,
          pressure: dict[str, sysmem.Pressure], rates: Rates | None) -> Verdict:
    """Evaluate every rule and return the most severe verdict among those that fired."""
    rules = [*_snapshot_rules(breakdown, meminfo), *_pressure_rules(pressure, rates), *_rate_rules(rates)]
    if not rules:
        return Verdict(UNKNOWN, ())
    fired = [rule.verdict for rule in rules if rule.fired]
    state = max(fired, key=SEVERITY.index, default=HEALTHY)
    return Verdict(state, tuple(rules), _scope_note(state, rules, breakdown))


def _scope_note(state: str, rules: list[Rule], breakdown: Breakdown | None) -> str | None:
    """Explain pressure signals on a node with plenty of memory available.

    PSI and vmstat are system-wide, so a memory cgroup that reclaims at its own limit
    raises them too while the node itself has memory to spare.
    """
    if state not in (UNDER_PRESSURE, THRASHING) or breakdown is None or breakdown.available_bytes is None:
        return None
    if any(rule.fired for rule in rules if rule.key in ("available_low", "unaccounted_high", "file_cache_small")):
        return None
    available_percent = _percent(breakdown.available_bytes, breakdown.total_bytes)
    return (f"MemAvailable is {available_percent:.0f} % of MemTotal, so the pressure most likely comes from "
            "memory cgroups reclaiming at their own limits, not from the node running out of memory")


def _percent(part: float, whole: float) -> float:
    return part / whole * 100.0 if whole else 0.0


def _format_percent(value: float) -> str:
    """Format a percentage so that a small nonzero share does not read as 0.0."""
    return f"{value:.2f} %" if value < 1 else f"{value:.1f} %"


def _snapshot_rules(breakdown: Breakdown | None, meminfo: dict[str, int] | None) -> list[Rule]:
    if breakdown is None or not meminfo:
        return []
    total = breakdown.total_bytes
    available = breakdown.available_bytes
    available_low = available is not None and available < AVAILABLE_LOW_FRACTION * total
    available_text = ("MemAvailable missing" if available is None
                      else f"MemAvailable {_format_percent(_percent(available, total))}")
    available_condition = f"MemAvailable < {AVAILABLE_LOW_FRACTION:.0%} of MemTotal"

    rules = [Rule("available_low", UNDER_PRESSURE, available_condition, available_text, available_low)]

    unaccounted_share = breakdown.unaccounted_bytes / total
    rules.append(Rule(
        "unaccounted_high", THRASHING_RISK,
        f"unaccounted memory > {UNACCOUNTED_RISK_FRACTION:.0%} of MemTotal and {available_condition}",
        f"unaccounted {_format_percent(unaccounted_share * 100)}, {available_text}",
        unaccounted_share > UNACCOUNTED_RISK_FRACTION and available_low))

    file_lru = file_lru_bytes(meminfo)
    mapped = meminfo.get("Mapped")
    if file_lru is not None and mapped is not None:
        # Mapped pages are in the file LRU. When they are most of it, reclaim has little
        # left to evict but pages that processes use, which are read back right away.
        rules.append(Rule(
            "file_cache_small", THRASHING_RISK,
            f"file LRU < {FILE_LRU_TO_MAPPED_RATIO:g} x Mapped and {available_condition}",
            f"file LRU {file_lru / GIB:.3f} GiB, Mapped {mapped / GIB:.3f} GiB, {available_text}",
            file_lru < FILE_LRU_TO_MAPPED_RATIO * mapped and available_low))
    return rules


def _pressure_rules(pressure: dict[str, sysmem.Pressure], rates: Rates | None) -> list[Rule]:
    rules = []
    for kind, threshold, verdict in (("some", PSI_SOME_PRESSURE_PERCENT, UNDER_PRESSURE),
                                     ("full", PSI_FULL_THRASHING_PERCENT, THRASHING)):
        condition = f"PSI memory {kind} >= {threshold:g} %"
        measured = rates.psi_percent.get(f"memory_{kind}") if rates else None
        line = getattr(pressure.get("memory"), kind, None)
        if measured is not None:
            value, where = measured, f"over {rates.interval_s:.1f} s"
        elif line is not None:
            value, where = line.avg10, "avg10"
        else:
            # Without PSI there is nothing to judge, and the sources list gives the reason.
            continue
        rules.append(Rule(f"psi_memory_{kind}", verdict, condition, f"{value:.1f} % ({where})", value >= threshold))
    return rules


def _rate_rules(rates: Rates | None) -> list[Rule]:
    if rates is None or rates.refaults_file_per_s is None:
        return []
    refaults = rates.refaults_file_per_s
    observed = f"{refaults:.0f} file refaults/s"
    rules = [Rule("refaults", UNDER_PRESSURE, f"file refaults >= {REFAULTS_PRESSURE_PER_S:g} pages/s",
                  observed, refaults >= REFAULTS_PRESSURE_PER_S)]

    major = rates.major_faults_per_s
    if major is not None:
        rules.append(Rule(
            "refaults_major_faults", THRASHING,
            f"file refaults >= {REFAULTS_THRASHING_PER_S:g} pages/s and major faults >= "
            f"{MAJOR_FAULTS_THRASHING_PER_S:g}/s",
            f"{observed}, {major:.0f} major faults/s",
            refaults >= REFAULTS_THRASHING_PER_S and major >= MAJOR_FAULTS_THRASHING_PER_S))

    io_full = rates.psi_percent.get("io_full")
    if io_full is not None:
        # Evicted code read back from disk shows up as tasks stalled on I/O.
        rules.append(Rule(
            "io_full_refaults", THRASHING,
            f"PSI io full >= {IO_FULL_THRASHING_PERCENT:g} % and file refaults >= {REFAULTS_PRESSURE_PER_S:g} pages/s",
            f"io full {io_full:.1f} %, {observed}",
            io_full >= IO_FULL_THRASHING_PERCENT and refaults >= REFAULTS_PRESSURE_PER_S))
    return rules


# Memory cgroups


def find_memory_controller(sysfs_root: str = "/sys") -> cgroupfs.MemoryController | None:
    """Find the memory controller under <sysfs_root>/fs/cgroup, v1 first.

    A v1 memory hierarchy wins because on a hybrid layout the v2 mount has no memory
    controller. Only the standard mount points are probed, so fixture trees work.
    """
    base = Path(sysfs_root, "fs", "cgroup")
    if (base / "memory" / "memory.usage_in_bytes").is_file():
        return cgroupfs.MemoryController(1, base / "memory")
    try:
        controllers = (base / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    return cgroupfs.MemoryController(2, base) if "memory" in controllers else None


def read_cgroups(sysfs_root: str = "/sys") -> CgroupState:
    """Read usage and limits of the kubepods and system.slice memory cgroups."""
    controller = find_memory_controller(sysfs_root)
    if controller is None:
        return CgroupState(None, None, (), f"no memory cgroup controller under {sysfs_root}/fs/cgroup")

    groups, problems = [], []
    for name in CGROUP_NAMES:
        try:
            memory = cgroupfs.read_memory(controller, "/" + name)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        if memory is not None:
            groups.append(_cgroup_usage(name, controller, memory))

    note = "; ".join(problems) or None
    if not groups and not problems:
        note = f"none of {', '.join(CGROUP_NAMES)} exists under {controller.mount}"
    return CgroupState(controller.version, str(controller.mount), tuple(groups), note)


def _cgroup_usage(name: str, controller: cgroupfs.MemoryController, memory: cgroupfs.CgroupMemory) -> CgroupUsage:
    stats = memory.stat
    if controller.version == 1:
        anon, file_bytes, kernel = stats.get("total_rss"), stats.get("total_cache"), None
    else:
        anon, file_bytes = stats.get("anon"), stats.get("file")
        # memory.stat has a "kernel" total since Linux 5.18. Before that, sum its parts.
        parts = [stats[key] for key in ("kernel_stack", "pagetables", "percpu", "sock", "vmalloc", "slab")
                 if key in stats]
        kernel = stats.get("kernel", sum(parts) if parts else None)
    return CgroupUsage(name, str(controller.directory(memory.path)), memory.usage_bytes, memory.limit_bytes,
                       anon, file_bytes, kernel)


# Protection state


def scan_processes(procfs_root: str = "/proc") -> list[ProcessInfo]:
    """Read comm and cmdline of every process, skipping processes that exit or cannot be read."""
    try:
        pids = procfs.list_pids(procfs_root)
    except OSError as exc:
        logger.warning("failed to list processes in %s: %s", procfs_root, exc.strerror)
        return []
    processes = []
    for pid in pids:
        try:
            processes.append(ProcessInfo(pid, procfs.read_comm(pid, procfs_root), _read_cmdline(pid, procfs_root)))
        except (ProcessGone, AccessDenied, OSError) as exc:
            logger.debug("skipped process %d: %s", pid, exc)
    return processes


def _read_cmdline(pid: int, procfs_root: str) -> tuple[str, ...]:
    path = f"{procfs_root}/{pid}/cmdline"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise translate_proc_error(exc, pid, path) from exc
    return tuple(os.fsdecode(arg) for arg in data.split(b"\0") if arg)


def is_prelock_run(argv: tuple[str, ...]) -> bool:
    """Return whether argv runs `prelock run`, directly, as a script or as `python -m prelock`."""
    for index, arg in enumerate(argv):
        if os.path.basename(arg) == "prelock":
            return _subcommand(argv[index + 1:]) == "run"
    return False


def _subcommand(args: tuple[str, ...]) -> str | None:
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--log-level":
            skip_value = True
        elif not arg.startswith("-"):
            return arg
    return None


def read_status_files(state_dirs: tuple[str, ...]) -> list[StatusFile]:
    """Read the status file that a running daemon writes into its state directory."""
    found = []
    for directory in state_dirs:
        path = Path(directory, STATUS_FILE)
        try:
            record = json.loads(path.read_text())
            updated_at = float(record.get("updated_at", path.stat().st_mtime))
            pid, locked = record.get("pid"), record.get("locked_bytes")
            found.append(StatusFile(str(path), int(pid) if pid is not None else None,
                                    int(locked) if locked is not None else None, max(0.0, time.time() - updated_at)))
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(StatusFile(str(path), None, None, None, f"read failed: {exc.strerror}"))
        except (ValueError, TypeError, AttributeError) as exc:
            found.append(StatusFile(str(path), None, None, None, f"invalid status file: {exc}"))
    return found


def measure_file(path: str, backend: str | None = None) -> pagecache.Residency:
    """Measure how much of a regular file is in the page cache (cachestat, else mincore)."""
    fd, st = pagecache.open_regular_file(path)
    try:
        return pagecache.measure(fd, st, backend or pagecache.default_backend(), path)
    finally:
        os.close(fd)


def inspect_kubelet(processes: list[ProcessInfo], procfs_root: str = "/proc") -> KubeletState:
    """Find a running kubelet and measure how much of its executable is cached."""
    kubelets = [process for process in processes if process.comm == "kubelet"]
    if not kubelets:
        return KubeletState(None, None, None, None, None, "no running kubelet found")
    kubelet = kubelets[0]
    reserved, eviction, settings_note = kubelet_settings(kubelet, procfs_root)
    exe_link = f"{procfs_root}/{kubelet.pid}/exe"
    backend = pagecache.default_backend()
    try:
        exe = procfs.read_exe(kubelet.pid, procfs_root)
        residency = measure_file(exe_link, backend)
    except (ProcessGone, AccessDenied, FileSkipped, OSError) as exc:
        note = f"cannot measure {exe_link}: {exc}"
        return KubeletState(kubelet.pid, None, None, None, None, note, reserved, eviction)

    cached = None
    if residency.cached_pages is not None:
        # Whole pages are counted, so a cached last page would count more than the file holds.
        cached = min(residency.cached_pages * native.PAGE_SIZE, residency.size_bytes)
    note = "; ".join(text for text in (residency.unknown_reason, settings_note) if text) or None
    return KubeletState(kubelet.pid, exe, residency.size_bytes, cached, backend, note, reserved, eviction)


def kubelet_settings(kubelet: ProcessInfo, procfs_root: str) -> tuple[str | None, str | None, str | None]:
    """Return kubelet's system-reserved memory, its memory.available eviction threshold and a note.

    Flags win over the config file, as in kubelet. None means the setting is absent.
    """
    flags = _parse_flags(kubelet.argv[1:], ("system-reserved", "eviction-hard", "config"))
    reserved = _pick_entry(flags.get("system-reserved"), "memory", "=")
    eviction = _pick_entry(flags.get("eviction-hard"), "memory.available", "<")
    config_path = flags.get("config")
    if config_path is None or (reserved is not None and eviction is not None):
        return reserved, eviction, None

    # The path is relative to kubelet's root and working directory, not to ours.
    base = "root" if config_path.startswith("/") else "cwd/"
    path = f"{procfs_root}/{kubelet.pid}/{base}{config_path}"
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        reserved = reserved or (config.get("systemReserved") or {}).get("memory")
        eviction = eviction or (config.get("evictionHard") or {}).get("memory.available")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        return reserved, eviction, f"cannot read kubelet config {path}: {exc}"
    return reserved, eviction, None


def _parse_flags(args: tuple[str, ...], names: tuple[str, ...]) -> dict[str, str]:
    flags = {}
    for index, arg in enumerate(args):
        name, sep, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or name not in names:
            continue
        if sep:
            flags[name] = value
        elif index + 1 < len(args):
            flags[name] = args[index + 1]
    return flags


def _pick_entry(text: str | None, key: str, separator: str) -> str | None:
    """Return the value of key in 'a=1,b=2' (or 'a<1,b<2') text, or None."""
    for entry in (text or "").split(","):
        name, sep, value = entry.partition(separator)
        if sep and name.strip() == key:
            return value.strip()
    return None


def inspect_protection(procfs_root: str, meminfo: dict[str, int] | None,
                       state_dirs: tuple[str, ...] | None) -> Protection:
    """Report the running prelock daemon, locked bytes, kubelet residency and early-OOM daemons.

    state_dirs None skips the status files, for runs against a fixture procfs.
    """
    processes = scan_processes(procfs_root)
    daemons = tuple(process.pid for process in processes if is_prelock_run(process.argv))
    early_oom = tuple(process for process in processes if process.comm in EARLY_OOM_DAEMONS)
    if state_dirs is None:
        status_files, status_note = [], "not checked: --procfs-root is not /proc"
    else:
        status_files = read_status_files(state_dirs)
        status_note = None if status_files else f"no {STATUS_FILE} in {' or '.join(state_dirs)}"
    mlocked = meminfo.get("Mlocked") if meminfo else None
    return Protection(daemons, tuple(status_files), status_note, mlocked,
                      inspect_kubelet(processes, procfs_root), early_oom)


# Recommendations

KUBELET_EVICTION_PERCENT = 5
# kubelet's defaults for the other hard eviction signals on Linux. Setting eviction-hard
# replaces the whole default set, so the suggestion repeats them.
KUBELET_OTHER_EVICTION_DEFAULTS = "nodefs.available<10%,imagefs.available<15%,nodefs.inodesFree<5%"
MGLRU_MIN_TTL_MS = 1000


@dataclass(frozen=True)
class RecommendationInputs:
    breakdown: Breakdown | None
    holders: tuple[Holder, ...]
    verdict: Verdict
    protection: Protection
    lru_gen: sysmem.LruGen | None
    cgroups: CgroupState
    sysfs_root: str

    @property
    def driver_memory_suspected(self) -> bool:
        if any(holder.kind in ("slab", "module") for holder in self.holders):
            return True
        breakdown = self.breakdown
        return breakdown is not None and breakdown.unaccounted_bytes > DRIVER_MEMORY_FRACTION * breakdown.total_bytes

    @property
    def at_risk(self) -> bool:
        return self.verdict.state in (UNDER_PRESSURE, THRASHING_RISK, THRASHING) or self.driver_memory_suspected


def recommend(inputs: RecommendationInputs) -> list[Recommendation]:
    """Return the recommendations that apply, each with its reason and exact setting."""
    recommendations = [
        _recommend_prelock(inputs),
        _recommend_mglru(inputs),
        _recommend_kubelet(inputs),
        _recommend_eviction_rate(inputs),
        _recommend_early_oom(inputs),
        _recommend_driver_memory(inputs),
    ]
    return [recommendation for recommendation in recommendations if recommendation is not None]


def _recommend_prelock(inputs: RecommendationInputs) -> Recommendation | None:
    protection = inputs.protection
    if protection.daemon_pids:
        return None
    reason = ("No `prelock run` process is running, so under memory pressure the kernel evicts the code "
              "pages of kubelet, containerd and sshd and reads them back from disk. The node then thrashes "
              "instead of reaching the OOM killer.")
    kubelet = protection.kubelet
    if kubelet.cached_bytes is not None and kubelet.size_bytes:
        reason += (f" kubelet has {_percent(kubelet.cached_bytes, kubelet.size_bytes):.0f} % of its "
                   "executable in the page cache now.")
    return Recommendation(
        "run_prelock", "Lock the code of running programs with prelock", reason,
        ("systemctl enable --now prelock.service",),
        "The unit runs prelock run -c /etc/prelock/prelock.yaml. On Kubernetes, run the prelock "
        "DaemonSet (deploy/kubernetes/ in the prelock source) instead.")


def _recommend_mglru(inputs: RecommendationInputs) -> Recommendation | None:
    lru_gen = inputs.lru_gen
    directory = "/sys/kernel/mm/lru_gen"
    enable = f"echo y > {directory}/enabled"
    set_ttl = f"echo {MGLRU_MIN_TTL_MS} > {directory}/min_ttl_ms"
    effect = (f"min_ttl_ms={MGLRU_MIN_TTL_MS} keeps the pages used in the last {MGLRU_MIN_TTL_MS} ms resident "
            "and runs the OOM killer when it cannot, instead of thrashing.")
    if lru_gen is None:
        reason = (f"{inputs.sysfs_root}/kernel/mm/lru_gen is missing, so this kernel has no multi-gen LRU "
                  f"(Linux 6.1+ with CONFIG_LRU_GEN). With it, {effect}")
        return Recommendation("mglru_min_ttl", "MGLRU thrashing prevention (not available on this kernel)",
                              reason, (enable, set_ttl), "Only on a kernel built with CONFIG_LRU_GEN.")
    if lru_gen.enabled and lru_gen.min_ttl_ms > 0:
        return None
    state = f"enabled={lru_gen.enabled_mask:#06x}, min_ttl_ms={lru_gen.min_ttl_ms}"
    commands = (set_ttl,) if lru_gen.enabled else (enable, set_ttl)
    persist = f"To keep it across reboots, add the tmpfiles.d line: w {directory}/min_ttl_ms - - - - {MGLRU_MIN_TTL_MS}"
    return Recommendation("mglru_min_ttl", "Turn on MGLRU thrashing prevention",
                          f"MGLRU is present ({state}). {effect}", commands, persist)


def _recommend_kubelet(inputs: RecommendationInputs) -> Recommendation | None:
    kubelet = inputs.protection.kubelet
    if kubelet.pid is not None and kubelet.system_reserved_memory and kubelet.eviction_hard_memory:
        return None
    if kubelet.pid is None:
        current = "No running kubelet was found; if this node runs one, check its settings."
    else:
        current = (f"kubelet runs with system-reserved memory {kubelet.system_reserved_memory or 'not set'} "
                   f"and eviction-hard memory.available {kubelet.eviction_hard_memory or 'not set (default 100Mi)'}.")
    reason = (f"{current} kubelet evicts pods when memory.available falls below --eviction-hard, and the "
              "default of 100Mi is reached only after reclaim has started evicting code pages. "
              "--system-reserved keeps memory for the node agents out of what pods may request. Memory that "
              "a driver allocates is charged to no pod, so eviction does not pick the pod behind it.")
    reserved_gib = _system_reserved_gib(inputs)
    eviction = f"memory.available<{KUBELET_EVICTION_PERCENT}%,{KUBELET_OTHER_EVICTION_DEFAULTS}"
    note = (f"These are kubelet flags. In the kubelet config file, set systemReserved: {{memory: {reserved_gib}Gi}} "
            f"and evictionHard with memory.available: \"{KUBELET_EVICTION_PERCENT}%\" and the other three "
            "signals, because a partial evictionHard drops their defaults.")
    return Recommendation("kubelet_reserved", "Reserve memory for the node and evict pods earlier", reason,
                          (f"--system-reserved=memory={reserved_gib}Gi", f"--eviction-hard='{eviction}'"), note)


def _system_reserved_gib(inputs: RecommendationInputs) -> int:
    """Suggest system.slice usage plus 25 %, or 5 % of MemTotal, rounded up to GiB (at least 1)."""
    system_slice = [group for group in inputs.cgroups.groups if group.name == "system.slice"]
    if system_slice:
        target_bytes = system_slice[0].usage_bytes * 1.25
    elif inputs.breakdown is not None:
        target_bytes = inputs.breakdown.total_bytes * 0.05
    else:
        target_bytes = GIB
    return max(1, -(-int(target_bytes) // GIB))


def _recommend_eviction_rate(inputs: RecommendationInputs) -> Recommendation | None:
    if not inputs.at_risk:
        return None
    reason = ("When a node goes NotReady, the node controller evicts its pods. A pod that exhausts node memory "
              "outside its cgroup then starts on the next node and takes that node down too. "
              "--node-eviction-rate (default 0.1 nodes per second) limits how fast pods are evicted from "
              "failed nodes while the zone is healthy. At 0.01, it is at most one node every 100 s.")
    return Recommendation("node_eviction_rate", "Slow down pod eviction from failed nodes", reason,
                          ("kube-controller-manager --node-eviction-rate=0.01",),
                          "This is a control-plane flag, set once per cluster.")


def _recommend_early_oom(inputs: RecommendationInputs) -> Recommendation | None:
    if inputs.protection.early_oom:
        return None
    reason = ("No early-OOM daemon (earlyoom, systemd-oomd, nohang) is running. The kernel OOM killer fires "
              "only when reclaim fails, and reclaim keeps succeeding while it can evict code pages, so the "
              "node livelocks. earlyoom kills a process as soon as MemAvailable falls below -m percent. It "
              "ranks processes by oom_score, which does not include driver memory, so add --prefer with the "
              "name of the workload that holds the driver.")
    return Recommendation(
        "early_oom", "Run an early-OOM daemon", reason,
        ("apt-get install earlyoom", "earlyoom -m 5 --avoid '^(kubelet|containerd|sshd|systemd|prelock)$'"),
        "Install with dnf on Fedora and RHEL. Put the arguments into the earlyoom service's configuration, "
        "then run systemctl enable --now earlyoom.")


def _recommend_driver_memory(inputs: RecommendationInputs) -> Recommendation | None:
    breakdown = inputs.breakdown
    if not inputs.driver_memory_suspected or breakdown is None:
        return None
    unaccounted = breakdown.unaccounted_bytes
    reason = (f"{unaccounted / GIB:.1f} GiB ({_percent(unaccounted, breakdown.total_bytes):.1f} % of MemTotal) "
              "is in no meminfo category.")
    for holder in inputs.holders:
        if holder.kind == "slab" and holder.estimate_bytes:
            reason += f" Slab {holder.name} tracks about {holder.estimate_bytes / GIB:.1f} GiB of driver pages."
    modules = [holder.name for holder in inputs.holders if holder.kind == "module"]
    if modules:
        reason += f" Loaded accelerator modules: {', '.join(modules)}."
    reason += (" Memory that a kernel driver allocates for a process is charged to no memory cgroup, so the "
               "pod's memory limit does not bound it and kubelet does not count it as pod usage.")

    device_files = sorted({holder.device_files for holder in inputs.holders if holder.device_files})
    devices = " ".join(device_files) or "/dev/dri/* /dev/accel/*"
    note = ("fuser lists the processes that hold the driver's device files open. Stop or fix the one that "
            "leaks: the driver frees what it allocated for a process when that process exits. To alert on "
            f"this, watch breakdown.unaccounted.percent_of_total in the JSON (above {DRIVER_MEMORY_FRACTION:.0%}).")
    return Recommendation("driver_memory", "Find the driver memory that no cgroup limits", reason,
                          (f"fuser -v {devices}", "prelock doctor --json --interval 0"), note)


# The whole report


def collect(procfs_root: str = "/proc", sysfs_root: str = "/sys", interval_s: float = 5.0,
            state_dirs: tuple[str, ...] | None = STATE_DIRS,
            sleep: Callable[[float], None] = time.sleep) -> Report:
    """Read everything, sample the rates over interval_s, and analyse it into a Report."""
    page_size = native.PAGE_SIZE
    snapshot = read_snapshot(procfs_root, sysfs_root)
    rates, rates_note = sample_rates(procfs_root, interval_s, snapshot, sleep)

    breakdown = build_breakdown(snapshot.meminfo) if snapshot.meminfo else None
    holders = tuple(find_holders(snapshot.modules, snapshot.slabs, snapshot.meminfo, page_size))
    cgroups = read_cgroups(sysfs_root)
    protection = inspect_protection(procfs_root, snapshot.meminfo, state_dirs)
    verdict = judge(breakdown, snapshot.meminfo, snapshot.pressure, rates)
    inputs = RecommendationInputs(breakdown, holders, verdict, protection, snapshot.lru_gen, cgroups, sysfs_root)

    return Report(procfs_root, sysfs_root, page_size, snapshot, breakdown, holders,
                  tuple(top_slabs(snapshot.slabs, page_size)), rates, rates_note, cgroups, protection, verdict,
                  tuple(recommend(inputs)))
