"""`prelock cache`: page-cache records for files, processes or cgroups.

collect() builds a Report: the records, their Sum row and the scope. prelock.cache_render
formats a Report as a table, terse rows or JSON. Counts are in pages of page_size bytes,
sizes in bytes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from prelock import native, pagecache, sysmem
from prelock.errors import AccessDenied, ProcessGone
from prelock.files import FileKey, FileSkipped, open_mapped_file, path_skip_reason
from prelock.pagemap import is_mlocked, pfns, present_file_pages, read_kpageflags, read_pagemap
from prelock.procfs import Mapping, list_pids, memory_cgroup_path, read_cgroup, read_comm, read_maps
from prelock.units import format_size

log = logging.getLogger(__name__)

SORT_KEYS = ("cached", "percent", "size", "name")

# open_mapped_file tries map_files first and /proc/PID/root second. When both routes fail
# for this many processes that map the file, the file is listed with the last reason.
MAX_OPEN_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    comm: str


@dataclass(slots=True)
class CacheRecord:
    """One listed file. Counts are None when unknown or not measured, and error gives the reason.

    Collection fills a record in place, step by step (residency, processes, locked pages).
    """

    path: str
    size_bytes: int | None = None
    pages: int | None = None
    cached_pages: int | None = None
    locked_pages: int | None = None
    dirty_pages: int | None = None
    evicted_pages: int | None = None
    recently_evicted_pages: int | None = None
    processes: tuple[ProcessRef, ...] = ()
    error: str | None = None
    key: FileKey | None = None

    @property
    def percent(self) -> float | None:
        """Cached share in percent; None for an empty file or unknown residency."""
        if not self.pages or self.cached_pages is None:
            return None
        return 100.0 * self.cached_pages / self.pages


@dataclass(frozen=True, slots=True)
class SumRow:
    """Totals over the listed files; Cached and Percent cover only files with known residency."""

    files: int
    unknown_files: int
    size_bytes: int
    pages: int
    cached_pages: int
    percent: float | None
    locked_pages: int | None
    dirty_pages: int | None
    evicted_pages: int | None
    recently_evicted_pages: int | None
    processes: int


@dataclass(frozen=True, slots=True)
class Scope:
    """Scope of the listing: one line of text plus the numbers behind it."""

    description: str
    processes: int | None
    files: int
    listed_files: int
    listed_cached_bytes: int
    all_cached_bytes: int
    meminfo_cached_bytes: int | None
    skipped_processes: dict[str, int]


@dataclass(frozen=True, slots=True)
class Report:
    page_size: int
    backend: str
    scope: Scope
    files: list[CacheRecord]
    sum: SumRow
    time_unix_s: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Query:
    """The selection: paths, or processes (by PID, by cgroup regex, or all for --top)."""

    paths: tuple[str, ...] = ()
    recursive: bool = False
    pids: tuple[int, ...] = ()
    cgroup_regex: re.Pattern | None = None
    top: int | None = None
    sort_by: str | None = None
    backend: str = "cachestat"

    @property
    def by_process(self) -> bool:
        return not self.paths


@dataclass
class ProcessScan:
    """Maps of the selected processes, with file mappings grouped by (st_dev, st_ino) from maps."""

    comms: dict[int, str] = field(default_factory=dict)
    maps: dict[int, list[Mapping]] = field(default_factory=dict)
    mappings_by_key: dict[FileKey, list[tuple[int, Mapping]]] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)


# Collection --------------------------------------------------------------------------

def collect(query: Query, procfs: str = "/proc") -> Report:
    """Measure the files the query selects and return the sorted, limited Report."""
    if query.by_process:
        pids = select_pids(query, procfs)
        scan = scan_processes(pids, procfs)
        measured = (measure_mapped(key, mappers, scan.comms, query.backend, procfs)
                    for key, mappers in scan.mappings_by_key.items())
        records = [record for record in measured if record is not None]
    else:
        scan = scan_processes([pid for pid in list_pids(procfs) if pid != os.getpid()], procfs)
        records = collect_paths(query.paths, query.recursive, query.backend)
        _attach_processes(records, scan)

    annotate_locked(records, scan, procfs)
    listed = sort_records(records, query.sort_by or ("cached" if query.by_process else None))
    if query.top is not None:
        listed = listed[:query.top]

    scope = build_scope(query, scan, records, listed, read_meminfo_cached_bytes(procfs))
    return Report(native.PAGE_SIZE, query.backend, scope, listed, sum_row(listed))


def select_pids(query: Query, procfs: str = "/proc") -> list[int]:
    """Return the PIDs to scan: those given, those whose memory cgroup matches, or all.

    The scanning process itself is left out of cgroup and --top selections, because its
    own mappings (Python and its libraries) are not what an operator asks about.
    """
    if query.pids:
        return list(query.pids)
    pids = [pid for pid in list_pids(procfs) if pid != os.getpid()]
    if query.cgroup_regex is None:
        return pids

    selected = []
    for pid in pids:
        try:
            cgroup_path = memory_cgroup_path(read_cgroup(pid, procfs))
        except (ProcessGone, AccessDenied):
            continue
        if query.cgroup_regex.search(cgroup_path):
            selected.append(pid)
    return selected


def scan_processes(pids: Iterable[int], procfs: str = "/proc") -> ProcessScan:
    """Read maps and comm of each PID; exited and access-denied processes are counted, not raised."""
    scan = ProcessScan()
    for pid in pids:
        try:
            mappings = read_maps(pid, procfs)
            comm = read_comm(pid, procfs)
        except ProcessGone:
            log.debug("skipped pid=%d: exited", pid)
            scan.skipped["exited"] += 1
            continue
        except AccessDenied as exc:
            log.debug("skipped pid=%d: %s", pid, exc)
            scan.skipped["access denied"] += 1
            continue
        if not mappings:
            continue  # kernel thread or zombie

        scan.comms[pid] = comm
        scan.maps[pid] = mappings
        seen: set[FileKey] = set()
        for mapping in mappings:
            key = (mapping.dev, mapping.inode)
            if mapping.file_backed and key not in seen:
                seen.add(key)
                scan.mappings_by_key.setdefault(key, []).append((pid, mapping))
    return scan


def measure_mapped(key: FileKey, mappers: list[tuple[int, Mapping]], comms: dict[int, str],
                   backend: str, procfs: str = "/proc") -> CacheRecord | None:
    """Measure the file behind one maps key through a process that maps it.

    Returns None when every process that mapped the file has exited since the scan.
    """
    path = mappers[0][1].path
    processes = tuple(ProcessRef(pid, comms[pid]) for pid, _ in mappers)
    record = CacheRecord(path, processes=processes, key=key)

    skip_reason = path_skip_reason(mappers[0][1])
    if skip_reason is not None:
        record.error = skip_reason
        return record

    reason = None
    failures = 0
    for pid, mapping in mappers:
        try:
            opened = open_mapped_file(pid, mapping, procfs)
        except FileSkipped as exc:
            if not os.path.isdir(f"{procfs}/{pid}"):
                continue  # exited since the scan: try the next process
            reason = str(exc)
        except OSError as exc:
            reason = f"open failed: {exc.strerror}"
        else:
            return _measure_opened(record, opened.fd, None, backend)
        failures += 1
        if failures == MAX_OPEN_ATTEMPTS:
            break

    if reason is None:
        log.debug("skipped %s: every process that mapped it exited", path)
        return None
    record.error = reason
    return record


def _measure_opened(record: CacheRecord, fd: int, st: os.stat_result | None, backend: str) -> CacheRecord:
    """Measure the open file fd (fstat first when st is None), close fd, and fill in record."""
    try:
        return _with_residency(record, pagecache.measure(fd, st or os.fstat(fd), backend, record.path))
    except OSError as exc:
        # The native wrappers put the syscall name in strerror, e.g. "mmap: No such device".
        record.error = f"measuring failed: {exc.strerror}"
        return record
    finally:
        os.close(fd)


def collect_paths(paths: Iterable[str], recursive: bool, backend: str) -> list[CacheRecord]:
    """Measure each path; directories are walked when recursive, else listed with a reason."""
    records = []
    for path, error in expand_paths(paths, recursive):
        records.append(CacheRecord(path, error=error) if error else measure_path(path, backend))
    return records


def measure_path(path: str, backend: str) -> CacheRecord:
    """Measure one file given by path; failures become the record's error."""
    try:
        fd, st = pagecache.open_regular_file(path)
    except FileSkipped as exc:
        return CacheRecord(path, error=str(exc))
    except OSError as exc:
        return CacheRecord(path, error=f"open failed: {exc.strerror}")
    return _measure_opened(CacheRecord(path, key=(st.st_dev, st.st_ino)), fd, st, backend)


def expand_paths(paths: Iterable[str], recursive: bool) -> Iterator[tuple[str, str | None]]:
    """Yield (path, error) per file: argument paths as given, directory entries when recursive.

    Inside a directory only regular files are yielded; symbolic links, FIFOs, devices and
    sockets there are skipped silently. An argument that is a directory without
    recursive, or a directory that cannot be read, is yielded with its error.
    """
    for path in paths:
        if not os.path.isdir(path):
            yield path, None
        elif not recursive:
            yield path, "is a directory; use -r to list the files in it"
        else:
            yield from _walk_regular_files(path)


def _walk_regular_files(directory: str) -> Iterator[tuple[str, str | None]]:
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        yield directory, f"listing the directory failed: {exc.strerror}"
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk_regular_files(entry.path)
            elif entry.is_file(follow_symlinks=False):
                yield entry.path, None
        except OSError as exc:
            yield entry.path, f"stat failed: {exc.strerror}"


def _with_residency(record: CacheRecord, residency: pagecache.Residency) -> CacheRecord:
    record.size_bytes = residency.size_bytes
    record.pages = residency.pages
    record.cached_pages = residency.cached_pages
    record.dirty_pages = residency.dirty_pages
    record.evicted_pages = residency.evicted_pages
    record.recently_evicted_pages = residency.recently_evicted_pages
    record.error = residency.unknown_reason
    return record


def _attach_processes(records: list[CacheRecord], scan: ProcessScan) -> None:
    """Set the processes of each record to those whose maps show its file key."""
    # NOTE: maps prints i_sb->s_dev, which differs from st_dev on btrfs subvolumes and for
    # files under overlayfs, so processes mapping such a path are not found.
    for record in records:
        mappers = scan.mappings_by_key.get(record.key, ()) if record.key else ()
        record.processes = tuple(ProcessRef(pid, scan.comms[pid]) for pid, _ in mappers)


# Locked pages ------------------------------------------------------------------------

def locked_column_available(procfs: str = "/proc") -> bool:
    """Check that this process can read PFNs from pagemap and flags from kpageflags."""
    # pagemap shows PFNs as zero without CAP_SYS_ADMIN, and kpageflags is mode 0400 root.
    return pagecache.has_capability(pagecache.CAP_SYS_ADMIN) and os.access(f"{procfs}/kpageflags", os.R_OK)


def annotate_locked(records: list[CacheRecord], scan: ProcessScan, procfs: str = "/proc") -> None:
    """Set locked_pages of each measured record, or leave None when PFNs are hidden from us."""
    if not locked_column_available(procfs):
        return
    measured = [record for record in records if record.key is not None and record.error is None]
    locked = locked_pages_by_key({record.key for record in measured}, scan.maps, procfs)
    for record in measured:
        record.locked_pages = locked.get(record.key, 0)


def locked_pages_by_key(keys: set[FileKey], known_maps: dict[int, list[Mapping]],
                        procfs: str = "/proc") -> dict[FileKey, int]:
    """Count, per file key, the distinct file pages whose page frame is PG_mlocked.

    The kernel sets PG_mlocked on a folio only while a VM_LOCKED mapping maps it whole,
    so every locked page is present in the page table of a process with VmLck > 0.
    Reading the pagemap of those processes alone therefore finds every locked page of
    the file, including pages locked by processes outside the listing's scope.

    NOTE: on Linux 6.18 a large folio that mlock() faults in by 16-page fault-around
    pieces never gets PG_mlocked, although reclaim still skips it because of VM_LOCKED.
    Locked counts PG_mlocked only, so it shows such pages as not locked.
    """
    if not keys:
        return {}
    pfn_by_page: dict[FileKey, dict[int, int]] = defaultdict(dict)
    for pid in list_pids(procfs):
        if _locks_memory(pid, procfs):
            _collect_file_pfns(pid, keys, known_maps.get(pid), pfn_by_page, procfs)

    all_pfns = [pfn for pages in pfn_by_page.values() for pfn in pages.values()]
    flags = read_kpageflags(all_pfns, procfs)
    return {key: sum(1 for pfn in pages.values() if is_mlocked(flags[pfn]))
            for key, pages in pfn_by_page.items()}


def _locks_memory(pid: int, procfs: str) -> bool:
    """Check VmLck in /proc/PID/status; False also when the process exited or is unreadable."""
    # Only one line is needed, and parsing all of status (procfs.read_status) took about
    # half of a --top run over 1,000 processes.
    try:
        with open(f"{procfs}/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return parse_vm_locked_kib(data) > 0


def parse_vm_locked_kib(status: bytes) -> int:
    """Return the VmLck value of /proc/PID/status text in KiB; 0 when the line is missing."""
    start = status.find(b"\nVmLck:")
    if start < 0:
        return 0
    fields = status[start + len(b"\nVmLck:"):].split(None, 1)
    return int(fields[0]) if fields and fields[0].isdigit() else 0


def _collect_file_pfns(pid: int, keys: set[FileKey], mappings: list[Mapping] | None,
                       pfn_by_page: dict[FileKey, dict[int, int]], procfs: str) -> None:
    """Record the PFN of each present page of pid's mappings of the files in keys."""
    try:
        mappings = mappings if mappings is not None else read_maps(pid, procfs)
        for mapping in mappings:
            key = (mapping.dev, mapping.inode)
            if key not in keys:
                continue
            raw = read_pagemap(pid, mapping.start, mapping.end, procfs)
            first_page = mapping.offset // native.PAGE_SIZE
            # A private copy-on-write page is anonymous, so only present file pages count.
            for index, (is_file_page, pfn) in enumerate(zip(present_file_pages(raw), pfns(raw))):
                if is_file_page and pfn:
                    pfn_by_page[key][first_page + index] = pfn
    except (ProcessGone, AccessDenied) as exc:
        log.debug("locked pages of pid=%d not read: %s", pid, exc)


# Sorting, totals and scope -----------------------------------------------------------

def sort_records(records: list[CacheRecord], sort_by: str | None) -> list[CacheRecord]:
    """Sort by cached pages, percent or size (largest first) or by name; None keeps the order.

    Records without the value (unknown residency, errors) go last in their input order.
    """
    if sort_by is None:
        return list(records)
    if sort_by == "name":
        return sorted(records, key=lambda record: record.path)
    value_of = {
        "cached": lambda record: record.cached_pages,
        "percent": lambda record: record.percent,
        "size": lambda record: record.size_bytes,
    }[sort_by]
    known = [record for record in records if value_of(record) is not None]
    unknown = [record for record in records if value_of(record) is None]
    return sorted(known, key=value_of, reverse=True) + unknown


def sum_row(records: list[CacheRecord]) -> SumRow:
    measured = [record for record in records if record.cached_pages is not None]
    pages_measured = sum(record.pages or 0 for record in measured)
    cached_pages = sum(record.cached_pages or 0 for record in measured)
    return SumRow(
        files=len(records),
        unknown_files=len(records) - len(measured),
        size_bytes=sum(record.size_bytes or 0 for record in records),
        pages=sum(record.pages or 0 for record in records),
        cached_pages=cached_pages,
        percent=100.0 * cached_pages / pages_measured if pages_measured else None,
        locked_pages=_sum_known(record.locked_pages for record in measured),
        dirty_pages=_sum_known(record.dirty_pages for record in measured),
        evicted_pages=_sum_known(record.evicted_pages for record in measured),
        recently_evicted_pages=_sum_known(record.recently_evicted_pages for record in measured),
        processes=len({process.pid for record in records for process in record.processes}),
    )


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def build_scope(query: Query, scan: ProcessScan, records: list[CacheRecord], listed: list[CacheRecord],
                meminfo_cached_bytes: int | None) -> Scope:
    page_size = native.PAGE_SIZE
    listed_cached_bytes = sum(record.cached_pages or 0 for record in listed) * page_size
    all_cached_bytes = sum(record.cached_pages or 0 for record in records) * page_size

    if query.by_process:
        processes = len(scan.comms)
        parts = [f"files mapped by {processes} {pluralize(processes, 'process', 'processes')}"
                 f" ({_selection_text(query)})"]
    else:
        processes = len({process.pid for record in records for process in record.processes})
        parts = [f"{len(records)} {pluralize(len(records), 'file', 'files')} from {len(query.paths)} "
                 f"{pluralize(len(query.paths), 'path', 'paths')}; {processes} of {len(scan.comms)} "
                 f"processes read map them"]
    if scan.skipped:
        skipped = sum(scan.skipped.values())
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(scan.skipped.items()))
        parts.append(f"{skipped} {pluralize(skipped, 'process', 'processes')} not read: {reasons}")
    if len(listed) < len(records):
        parts.append(f"top {len(listed)} of {len(records)} files")
    parts.append(_cached_share_text(listed_cached_bytes, all_cached_bytes, len(records) - len(listed),
                                    meminfo_cached_bytes))
    return Scope("; ".join(parts), processes if query.by_process else None, len(records), len(listed),
                 listed_cached_bytes, all_cached_bytes, meminfo_cached_bytes, dict(scan.skipped))


def _selection_text(query: Query) -> str:
    if query.pids:
        return f"{pluralize(len(query.pids), 'PID', 'PIDs')} {', '.join(str(pid) for pid in query.pids)}"
    if query.cgroup_regex is not None:
        return f"memory cgroup matches {query.cgroup_regex.pattern!r}"
    return "all processes"


def _cached_share_text(listed_bytes: int, all_bytes: int, unlisted_files: int,
                       meminfo_cached_bytes: int | None) -> str:
    """Say how much page cache the listed files hold, also as a share of meminfo's Cached."""
    def share(size_bytes: int) -> str:
        if not meminfo_cached_bytes:
            return format_size(size_bytes)
        return f"{format_size(size_bytes)} ({100.0 * size_bytes / meminfo_cached_bytes:.1f}%)"

    text = f"cached: listed files {share(listed_bytes)}"
    if unlisted_files:
        text += f", all files {share(all_bytes)}"
    if meminfo_cached_bytes:
        text += f" of meminfo Cached {format_size(meminfo_cached_bytes)}"
    return text


def pluralize(count: int, singular: str, plural: str) -> str:
    return singular if count == 1 else plural


def read_meminfo_cached_bytes(procfs: str = "/proc") -> int | None:
    try:
        return sysmem.read_meminfo(procfs).get("Cached")
    except OSError as exc:
        log.debug("meminfo not read: %s", exc)
        return None
