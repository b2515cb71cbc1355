"""The lock plan: which files and page extents to hold, in what order, within the budget.

Pure policy: the inputs are the scanned targets and their file extents; nothing here
makes a syscall.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from prelock.files import FileKey
from prelock.native import PAGE_SIZE
from prelock.procfs import Mapping

if TYPE_CHECKING:
    from prelock.config import Config
    from prelock.scan import FileUsage, ScanResult

TIERS = ("critical", "others")


@dataclass(frozen=True)
class FileSource:
    """One way to open the file again: a process that maps it and the mapping, or, for
    a file restored from the snapshot, a path whose file must still have the key."""

    pid: int
    mapping: Mapping | None
    path: str | None = None


@dataclass(frozen=True)
class PlannedFile:
    key: FileKey
    path: str  # for messages only; never used to open the file
    tier: str
    size_bytes: int
    extents: tuple[tuple[int, int], ...]  # file page ranges [first, last), sorted, merged
    pages_planned: int
    pages_mapped: int
    owners: tuple[tuple[int, str], ...]  # (pid, comm)
    sources: tuple[FileSource, ...]

    @property
    def planned_bytes(self) -> int:
        return self.pages_planned * PAGE_SIZE


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str
    key: FileKey | None = None
    tier: str | None = None
    size_bytes: int = 0


@dataclass(frozen=True)
class Plan:
    files: tuple[PlannedFile, ...]  # in lock order: critical first, then by benefit per byte
    skipped: tuple[SkippedFile, ...]
    budget_bytes: int
    mode: str
    targets: dict[str, int] = field(default_factory=dict)  # tier -> number of processes


@dataclass(frozen=True)
class MemoryState:
    """The numbers the budget depends on, in bytes."""

    total_bytes: int
    available_bytes: int
    held_bytes: int = 0  # what the daemon already holds; it counts against the budget, not the floor
    cgroup_limit_bytes: int | None = None  # the daemon's own memory cgroup limit


# Room left below the daemon's own cgroup limit for its interpreter, page tables and scan
# buffers: pages it faults in while locking are charged to its cgroup.
CGROUP_HEADROOM_BYTES = 128 << 20


def budget_bytes(config: Config, memory: MemoryState) -> int:
    """Resolve lock.budget against MemTotal and cap it below the daemon's cgroup limit."""
    budget = config.lock.budget.resolve(memory.total_bytes)
    if memory.cgroup_limit_bytes is not None:
        budget = min(budget, max(memory.cgroup_limit_bytes - CGROUP_HEADROOM_BYTES, 0))
    return budget


def build_plan(scan: ScanResult, config: Config, memory: MemoryState) -> Plan:
    """Order the scanned files, apply max_file_size, the budget and the min_available floor."""
    budget = budget_bytes(config, memory)
    # New locks may not push MemAvailable below the floor; what is already held is
    # already out of MemAvailable.
    floor = config.lock.min_available.resolve(memory.total_bytes)
    allowed = min(budget, memory.held_bytes + max(memory.available_bytes - floor, 0))

    candidates, skipped = _candidates(scan, config)
    files = []
    used = 0
    for planned in sorted(candidates, key=_priority):
        if used + planned.planned_bytes > allowed:
            reason = "over budget" if used + planned.planned_bytes > budget else "min_available floor"
            skipped.append(SkippedFile(planned.path, reason, planned.key, planned.tier, planned.size_bytes))
            continue
        used += planned.planned_bytes
        files.append(planned)

    return Plan(tuple(files), tuple(skipped), budget, config.lock.mode, _count_tiers(scan))


def _candidates(scan: ScanResult, config: Config) -> tuple[list[PlannedFile], list[SkippedFile]]:
    candidates = []
    skipped = list(scan.skipped)
    for usage in scan.files.values():
        if usage.size_bytes > config.lock.max_file_size_bytes:
            skipped.append(SkippedFile(usage.path, "larger than lock.max_file_size", usage.key,
                                       usage.tier, usage.size_bytes))
            continue
        extents = extents_for_mode(usage, config.lock.mode)
        if not extents:
            continue
        candidates.append(PlannedFile(
            key=usage.key,
            path=usage.path,
            tier=usage.tier,
            size_bytes=usage.size_bytes,
            extents=tuple(extents),
            pages_planned=count_pages(extents),
            pages_mapped=count_pages(usage.mapped),
            owners=tuple(sorted(usage.owners.items())),
            sources=tuple(usage.sources),
        ))
    return candidates, skipped


def extents_for_mode(usage: FileUsage, mode: str) -> list[tuple[int, int]]:
    if mode == "working-set":
        return usage.present
    if mode == "mapped":
        return usage.mapped
    return [(0, usage.size_pages)] if usage.size_pages else []


def _priority(planned: PlannedFile) -> tuple:
    # Critical first. Within a tier, a page shared by more processes saves more faults
    # per byte locked, so more owners first, then the smaller file.
    return (TIERS.index(planned.tier), -len(planned.owners), planned.pages_planned, planned.path)


def _count_tiers(scan: ScanResult) -> dict[str, int]:
    pids: dict[str, set[int]] = {tier: set() for tier in TIERS}
    for usage in scan.files.values():
        for pid in usage.owners:
            pids[usage.tier].add(pid)
    return {tier: len(found) for tier, found in pids.items()}


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort [first, last) ranges and merge the ones that overlap or touch."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1]:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def count_pages(ranges: list[tuple[int, int]]) -> int:
    return sum(last - first for first, last in ranges)


def path_selected(path: str, include: tuple[re.Pattern, ...], exclude: tuple[re.Pattern, ...]) -> bool:
    if include and not any(p.search(path) for p in include):
        return False
    return not any(p.search(path) for p in exclude)
