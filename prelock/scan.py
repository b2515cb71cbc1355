"""Collecting the files that targets map, with their mapped and present page extents.

This is the one place that turns targets into file usage: it reads maps and pagemap
of each target and opens each distinct file once to learn its key and size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from prelock import cgroupfs, pagemap, procfs
from prelock.config import Config
from prelock.errors import AccessDenied, PrelockError, ProcessGone
from prelock.files import FileKey, FileSkipped, open_mapped_file, path_skip_reason
from prelock.native import PAGE_SIZE
from prelock.plan import FileSource, MemoryState, Plan, SkippedFile, build_plan, merge_ranges, path_selected
from prelock.procfs import Mapping
from prelock.sysmem import read_meminfo
from prelock.targets import Target, select_targets

log = logging.getLogger(__name__)

MAX_SOURCES = 4


@dataclass
class FileUsage:
    """Usage of one file by the targets: its mapped and present page ranges and owners."""

    key: FileKey
    path: str
    size_bytes: int
    tier: str
    executable: bool = False
    owners: dict[int, str] = field(default_factory=dict)  # pid -> comm
    sources: list[FileSource] = field(default_factory=list)
    mapped: list[tuple[int, int]] = field(default_factory=list)  # file pages [first, last)
    present: list[tuple[int, int]] = field(default_factory=list)

    @property
    def size_pages(self) -> int:
        return -(-self.size_bytes // PAGE_SIZE)


@dataclass
class ScanResult:
    files: dict[FileKey, FileUsage]
    skipped: list[SkippedFile]
    targets_read: int = 0
    processes_gone: int = 0
    processes_denied: int = 0


def collect(targets: list[Target], config: Config, proc_root: str = "/proc") -> ScanResult:
    """Scan the maps and pagemaps of targets into per-file usage."""
    result = ScanResult({}, [])
    # maps (dev, inode) -> opened key, or None when the file was skipped: one open per file.
    resolved: dict[tuple[int, int], FileKey | None] = {}
    for target in targets:
        try:
            _collect_process(target, config, proc_root, result, resolved)
            result.targets_read += 1
        except ProcessGone:
            result.processes_gone += 1
            log.debug("process %d (%s) exited during the scan", target.pid, target.comm)
        except AccessDenied as exc:
            result.processes_denied += 1
            log.debug("process %d (%s) skipped: %s", target.pid, target.comm, exc)

    if config.files.kinds == "code":
        result.files = {key: usage for key, usage in result.files.items() if usage.executable}
    for usage in result.files.values():
        usage.mapped = merge_ranges(usage.mapped)
        usage.present = merge_ranges(usage.present)
    return result


def _collect_process(target: Target, config: Config, proc_root: str, result: ScanResult,
                     resolved: dict[tuple[int, int], FileKey | None]) -> None:
    # task_id is the pid, or a live thread's id once the main thread has exited.
    task_id, all_mappings = procfs.read_task_maps(target.pid, proc_root)
    mappings = [m for m in all_mappings if _wanted(m, config)]
    if not mappings:
        return
    pagemap_fd = pagemap.open_pagemap(task_id, proc_root)
    try:
        for mapping in mappings:
            usage = _usage_for(target, task_id, mapping, proc_root, result, resolved)
            if usage is not None:
                _add_mapping(usage, target, task_id, mapping, pagemap_fd)
    finally:
        os.close(pagemap_fd)


def _wanted(mapping: Mapping, config: Config) -> bool:
    # Writable mappings hold data the process changes, not code.
    if not mapping.readable or mapping.writable or path_skip_reason(mapping) is not None:
        return False
    return path_selected(mapping.path, config.files.include, config.files.exclude)


def _usage_for(target: Target, task_id: int, mapping: Mapping, proc_root: str, result: ScanResult,
               resolved: dict[tuple[int, int], FileKey | None]) -> FileUsage | None:
    maps_key = (mapping.dev, mapping.inode)
    if maps_key in resolved:
        key = resolved[maps_key]
        return None if key is None else result.files[key]

    try:
        opened = open_mapped_file(task_id, mapping, proc_root)
    except FileSkipped as exc:
        if str(exc) != "mapping gone":
            resolved[maps_key] = None
            result.skipped.append(SkippedFile(mapping.path, str(exc), maps_key, target.tier))
            log.debug("skip %s: %s", mapping.path, exc)
        return None
    os.close(opened.fd)

    resolved[maps_key] = opened.key
    usage = result.files.get(opened.key)
    if usage is None:
        usage = FileUsage(opened.key, mapping.path, opened.size_bytes, target.tier)
        result.files[opened.key] = usage
    return usage


def _add_mapping(usage: FileUsage, target: Target, task_id: int, mapping: Mapping, pagemap_fd: int) -> None:
    if target.tier == "critical":
        usage.tier = "critical"
    usage.executable = usage.executable or mapping.executable
    usage.owners.setdefault(target.pid, target.comm)
    if len(usage.sources) < MAX_SOURCES and all(s.pid != task_id for s in usage.sources):
        usage.sources.append(FileSource(task_id, mapping))

    first_page = mapping.offset // PAGE_SIZE
    # Pages wholly beyond the end of the file cannot be populated (SIGBUS territory).
    last_page = min(first_page + mapping.size_bytes // PAGE_SIZE, usage.size_pages)
    if last_page <= first_page:
        return
    usage.mapped.append((first_page, last_page))

    raw = pagemap.read_entries(pagemap_fd, mapping.start, mapping.start + (last_page - first_page) * PAGE_SIZE)
    for begin, end in pagemap.runs(pagemap.present_file_pages(raw)):
        usage.present.append((first_page + begin, first_page + end))


def own_cgroup_limit_bytes() -> int | None:
    """Return the memory limit of this process's cgroup (the smallest on its path)."""
    controller = cgroupfs.memory_controller()
    if controller is None:
        return None
    path = procfs.memory_cgroup_path(procfs.read_cgroup(os.getpid()))
    return cgroupfs.effective_limit_bytes(controller, path)


def scan_and_plan(config: Config, proc_root: str = "/proc", held_bytes: int = 0) -> tuple[Plan, ScanResult]:
    """Run one scan of the running system and plan it; this process is never a target."""
    targets, denied = select_targets(config, proc_root, exclude_pids=frozenset({os.getpid()}))
    scan = collect(targets, config, proc_root)
    scan.processes_denied += denied
    meminfo = read_meminfo(proc_root)
    if "MemTotal" not in meminfo:
        raise PrelockError(f"{proc_root}/meminfo has no MemTotal line: is {proc_root} a procfs mount?")
    memory = MemoryState(
        total_bytes=meminfo["MemTotal"],
        available_bytes=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        held_bytes=held_bytes,
        cgroup_limit_bytes=own_cgroup_limit_bytes(),
    )
    return build_plan(scan, config, memory), scan
