"""The held set: the files the daemon maps, populates and keeps locked.

Each held file is one read-only shared mapping of the whole file, so it costs one VMA.
mlock2(MLOCK_ONFAULT) makes the mapping lock-on-fault, and MADV_POPULATE_READ on the
planned extents faults their pages in, which locks them. The locker never reads the
bytes of a mapping: after another process truncates the file, such a read raises SIGBUS.

The locker holds what it is given. The plan decides what to lock and in which order,
and the daemon decides when a file that left the plan is released.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from prelock import native
from prelock.errors import PrelockError
from prelock.files import FileKey, FileSkipped, OpenedFile, open_file_by_path, open_mapped_file
from prelock.pagemap import present_file_pages, read_pagemap, runs
from prelock.plan import TIERS, PlannedFile, count_pages, merge_ranges
from prelock.units import format_size

log = logging.getLogger(__name__)

PAGE_SIZE = native.PAGE_SIZE

# The kernel default of vm.max_map_count, used when /proc/sys cannot be read.
DEFAULT_MAX_MAP_COUNT = 65530

# A page table spans PAGE_SIZE / 8 entries of one page each on 64-bit architectures:
# 2 MiB with 4 KiB pages.
_FALLBACK_PMD_SIZE = PAGE_SIZE * (PAGE_SIZE // 8)

REASON_OVER_BUDGET = "over budget"
REASON_MEMLOCK = "RLIMIT_MEMLOCK reached"
REASON_VMA_LIMIT = "VMA limit"
REASON_KEY_CHANGED = "the mapped file was replaced since the scan"
REASON_NO_EXTENTS = "no pages planned"
REASON_STOPPING = "the daemon is stopping"

# 64 MiB of 4 KiB pages: about half a second from a disk that reads 128 MiB/s.
POPULATE_CHUNK_PAGES = (64 << 20) // native.PAGE_SIZE

# mlock2 fails with ENOMEM (or EAGAIN) when RLIMIT_MEMLOCK is too small for the mapping
# and with EPERM when the limit is 0, unless the caller has CAP_IPC_LOCK. The limit
# counts the whole length of each locked VMA, populated or not. mmap fails with EAGAIN
# for the same reason while mlockall(MCL_FUTURE) is in force, and then counts the 2 MiB
# span that _mmap_aligned maps before trimming, so small files hit the limit sooner.
_MLOCK2_LIMIT_ERRNOS = frozenset({errno.ENOMEM, errno.EAGAIN, errno.EPERM})
_MMAP_LIMIT_ERRNOS = frozenset({errno.EAGAIN})
# MADV_POPULATE_READ fails with EFAULT on pages beyond the end of a truncated file,
# and with ENOMEM when the range is not fully mapped or the fault ran out of memory.
_POPULATE_CHANGED_ERRNOS = frozenset({errno.EFAULT, errno.ENOMEM})


@dataclass(frozen=True)
class HeldFile:
    """One file the locker maps and keeps locked."""

    key: FileKey
    path: str  # for messages only
    tier: str
    addr: int
    length_bytes: int  # the mapping: the file size when mapped, rounded up to a page
    extents: tuple[tuple[int, int], ...]  # file page ranges [first, last) populated so far
    locked_bytes: int  # pages present in the mapping, which reclaim cannot evict, when last measured
    owners: tuple[tuple[int, str], ...]  # (pid, comm) of the targets that map the file


@dataclass
class ApplyReport:
    """The outcome of one apply(), for the daemon's warnings and cycle summary."""

    locked: list[tuple[FileKey, str]] = field(default_factory=list)  # newly held
    grown: list[tuple[FileKey, str]] = field(default_factory=list)  # held, more extents now
    skipped: list[tuple[FileKey, str, str]] = field(default_factory=list)  # (key, path, reason)
    # Files released because they shrank or were truncated. The next scan stats them again.
    changed: list[tuple[FileKey, str]] = field(default_factory=list)
    memlock_limited: bool = False
    locked_bytes_by_tier: dict[str, int] = field(default_factory=dict)


class _Skipped(Exception):
    """The planned file is not locked, or not grown, this cycle. str(exc) is the reason."""

    def __init__(self, reason: str, release: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.release = release  # True when a held file must be released as well


class _FileChanged(Exception):
    """The file is shorter than the plan expects: it was truncated or replaced in place."""


@dataclass
class _Cycle:
    """Running totals of one apply()."""

    budget_bytes: int
    total_bytes: int
    vmas: int
    memlock_limited: bool = False


class Locker:
    """The held set: one lock-on-fault mapping per file, populated on the planned extents."""

    def __init__(self, procfs: str = "/proc", max_vmas: int | None = None):
        if not native.has_populate_read():
            raise PrelockError("madvise(MADV_POPULATE_READ) is not available: "
                               "prelock needs Linux 5.14 or later")
        self._procfs = procfs
        self._held: dict[FileKey, HeldFile] = {}
        self._should_stop: Callable[[], bool] | None = None
        # Past vm.max_map_count, mmap and every VMA split fail with ENOMEM, and malloc in
        # this process can fail too, so the held set stays below half of it.
        self.max_vmas = max_vmas if max_vmas is not None else read_max_map_count(procfs) // 2

    @property
    def held(self) -> Mapping[FileKey, HeldFile]:
        """A read-only view of the held files by file key."""
        return MappingProxyType(self._held)

    def apply(self, planned_files: Iterable[PlannedFile], budget_bytes: int,
              should_stop: Callable[[], bool] | None = None) -> ApplyReport:
        """Lock the planned files in order, within budget_bytes of locked memory in total.

        Held files stay mapped and are populated further where the plan grew. Files that
        left the plan stay held: the daemon releases them with release(). The total stays
        within budget_bytes unless the files held before the call already exceed it.
        """
        present_by_key = self._measure_all()
        cycle = _Cycle(budget_bytes, self.total_locked_bytes(), self.vma_count())
        report = ApplyReport()

        # Populating a large cold file takes seconds, so a stop request is honoured
        # between files and between populate chunks.
        self._should_stop = should_stop
        try:
            for planned in planned_files:
                if should_stop is not None and should_stop():
                    break
                self._apply_one(planned, present_by_key.pop(planned.key, None), cycle, report)
        finally:
            self._should_stop = None

        report.memlock_limited = cycle.memlock_limited
        report.locked_bytes_by_tier = self.locked_bytes_by_tier()
        return report

    def _apply_one(self, planned: PlannedFile, present: bytes | None, cycle: _Cycle,
                   report: ApplyReport) -> None:
        try:
            if planned.key in self._held:
                self._update(self._held[planned.key], planned, present, cycle, report)
            else:
                self._add(planned, cycle, report)
        except _Skipped as exc:
            if exc.release:
                self._drop(planned.key, cycle)
            if exc.reason == REASON_MEMLOCK:
                cycle.memlock_limited = True
            report.skipped.append((planned.key, planned.path, exc.reason))
            log.debug("skipped %s reason=%s", planned.path, exc.reason)
        except _FileChanged:
            self._drop(planned.key, cycle)
            report.changed.append((planned.key, planned.path))
            log.debug("changed %s: shorter than planned, released", planned.path)
        except OSError as exc:
            log.error("locking %s failed, file released: %s", planned.path, exc)
            self._drop(planned.key, cycle)
            report.skipped.append((planned.key, planned.path, exc.strerror or str(exc)))

    def _add(self, planned: PlannedFile, cycle: _Cycle, report: ApplyReport) -> None:
        extents = tuple(planned.extents)
        if not extents:
            raise _Skipped(REASON_NO_EXTENTS)

        held = self._map(planned, extents, count_pages(extents) * PAGE_SIZE, cycle)

        self._held[planned.key] = held
        report.locked.append((planned.key, planned.path))
        self._log_held("locked", held)

    def _update(self, held: HeldFile, planned: PlannedFile, present: bytes | None, cycle: _Cycle,
                report: ApplyReport) -> None:
        # NOTE: extents that left the plan stay populated and locked, because unlocking
        # part of a mapping takes munlock of a range, which splits the VMA. The whole
        # file is released once no target maps it.
        extents = tuple(merge_ranges([*held.extents, *planned.extents]))
        if present is None:
            present = self._present(held.addr, held.length_bytes)

        # A page of a populated extent is missing after a truncate, or after a rewrite
        # in place, both of which drop the file's pages from every mapping.
        missing = _missing_extents(present, extents)
        if not missing:
            updated = replace(held, extents=extents)
        elif extents[-1][1] * PAGE_SIZE > held.length_bytes:
            updated = self._remap(held, planned, extents, missing, cycle)
        else:
            updated = self._populate_held(held, extents, missing, cycle)

        self._held[held.key] = replace(updated, path=planned.path, tier=planned.tier,
                                       owners=planned.owners)
        if extents != held.extents:
            report.grown.append((held.key, planned.path))
            self._log_held("grew", self._held[held.key])

    def _populate_held(self, held: HeldFile, extents: tuple[tuple[int, int], ...],
                       missing: tuple[tuple[int, int], ...], cycle: _Cycle) -> HeldFile:
        if cycle.total_bytes + count_pages(missing) * PAGE_SIZE > cycle.budget_bytes:
            raise _Skipped(REASON_OVER_BUDGET)

        _populate(held.addr, missing, held.path, self._should_stop)
        locked_bytes = self._measure(held.addr, held.length_bytes)

        # The new pages cannot be unlocked without splitting the VMA, so a file that
        # went over budget is released whole.
        total_bytes = cycle.total_bytes - held.locked_bytes + locked_bytes
        if total_bytes > cycle.budget_bytes:
            raise _Skipped(REASON_OVER_BUDGET, release=True)
        cycle.total_bytes = total_bytes
        return replace(held, extents=extents, locked_bytes=locked_bytes)

    def _remap(self, held: HeldFile, planned: PlannedFile, extents: tuple[tuple[int, int], ...],
               missing: tuple[tuple[int, int], ...], cycle: _Cycle) -> HeldFile:
        """Map the file again at its new length, because the extents grew past the mapping."""
        # The new mapping is populated before the old one goes, so pages locked through
        # the old mapping stay locked throughout.
        new_held = self._map(planned, extents, count_pages(missing) * PAGE_SIZE, cycle, replacing=held)
        try:
            self._unmap(held)
        except OSError:
            _munmap_quietly(new_held.addr, new_held.length_bytes, new_held.path)
            cycle.total_bytes += held.locked_bytes - new_held.locked_bytes
            cycle.vmas -= 1
            raise
        cycle.vmas -= 1
        return new_held

    def _map(self, planned: PlannedFile, extents: tuple[tuple[int, int], ...], missing_bytes: int,
             cycle: _Cycle, replacing: HeldFile | None = None) -> HeldFile:
        """Map, lock on fault and populate extents of the planned file, and return its record."""
        if cycle.memlock_limited:
            raise _Skipped(REASON_MEMLOCK)
        if cycle.vmas + 1 > self.max_vmas:
            raise _Skipped(REASON_VMA_LIMIT)
        if cycle.total_bytes + missing_bytes > cycle.budget_bytes:
            raise _Skipped(REASON_OVER_BUDGET)

        addr, length_bytes = self._open_and_map(planned, extents)
        cycle.vmas += 1
        try:
            locked_bytes = self._lock_and_populate(addr, length_bytes, extents, planned.path)
        except BaseException:
            _munmap_quietly(addr, length_bytes, planned.path)
            cycle.vmas -= 1
            raise

        replaced_bytes = replacing.locked_bytes if replacing is not None else 0
        total_bytes = cycle.total_bytes - replaced_bytes + locked_bytes
        if total_bytes > cycle.budget_bytes:
            _munmap_quietly(addr, length_bytes, planned.path)
            cycle.vmas -= 1
            raise _Skipped(REASON_OVER_BUDGET)
        cycle.total_bytes = total_bytes

        return HeldFile(key=planned.key, path=planned.path, tier=planned.tier, addr=addr,
                        length_bytes=length_bytes, extents=extents, locked_bytes=locked_bytes,
                        owners=planned.owners)

    def _open_and_map(self, planned: PlannedFile, extents: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        opened = self._open(planned)
        try:
            length_bytes = _round_up_to_page(opened.size_bytes)
            if extents[-1][1] * PAGE_SIZE > length_bytes:
                raise _FileChanged()
            try:
                addr = _mmap_aligned(opened.fd, length_bytes, planned.path)
            except OSError as exc:
                if exc.errno in _MMAP_LIMIT_ERRNOS:
                    raise _Skipped(REASON_MEMLOCK) from None
                raise
        finally:
            # The mapping keeps its own reference to the file.
            os.close(opened.fd)
        return addr, length_bytes

    def _lock_and_populate(self, addr: int, length_bytes: int, extents: tuple[tuple[int, int], ...],
                           path: str) -> int:
        """Make the mapping lock-on-fault, populate extents and return the bytes locked."""
        try:
            # Without mlockall(MCL_ONFAULT) in force the mapping is not locked yet. mlock2
            # over a whole VMA changes its flags without splitting it.
            native.mlock2(addr, length_bytes, native.MLOCK_ONFAULT, path=path)
        except OSError as exc:
            if exc.errno in _MLOCK2_LIMIT_ERRNOS:
                raise _Skipped(REASON_MEMLOCK) from None
            raise
        # Without MADV_RANDOM, each cold fault reads read_ahead_kb around the page.
        native.madvise(addr, length_bytes, native.MADV_RANDOM, path=path)
        _populate(addr, extents, path, self._should_stop)
        return self._measure(addr, length_bytes)

    def _open(self, planned: PlannedFile) -> OpenedFile:
        """Open the planned file through the first source that still reaches it."""
        reason = "no process maps the file any more"
        for source in planned.sources:
            try:
                if source.mapping is None:
                    opened = open_file_by_path(source.path, planned.key)
                else:
                    opened = open_mapped_file(source.pid, source.mapping, self._procfs)
            except FileSkipped as exc:
                reason = str(exc)
                continue
            except OSError as exc:
                reason = f"open failed: {exc.strerror}"
                continue
            if opened.key == planned.key:
                return opened
            os.close(opened.fd)
            reason = REASON_KEY_CHANGED
        raise _Skipped(reason)

    def release(self, key: FileKey) -> HeldFile | None:
        """Unmap a held file, which unlocks its pages, and return its record (None if not held)."""
        held = self._held.get(key)
        if held is None:
            return None
        try:
            self._unmap(held)
        except OSError as exc:
            log.error("releasing %s failed, still held: %s", held.path, exc)
            return None
        del self._held[key]
        log.debug("released %s size=%s", held.path, format_size(held.locked_bytes))
        return held

    def release_all(self) -> None:
        """Release every held file."""
        for key in list(self._held):
            self.release(key)

    def _drop(self, key: FileKey, cycle: _Cycle) -> None:
        """Release key, if held, and take it out of the running totals."""
        held = self.release(key)
        if held is not None:
            cycle.total_bytes -= held.locked_bytes
            cycle.vmas -= 1

    def _unmap(self, held: HeldFile) -> None:
        native.munmap(held.addr, held.length_bytes, path=held.path)

    def total_locked_bytes(self) -> int:
        """Return the bytes locked over all held files, as last measured."""
        return sum(held.locked_bytes for held in self._held.values())

    def locked_bytes_by_tier(self) -> dict[str, int]:
        """Return the bytes locked per tier, as last measured. Every tier is listed, even at 0."""
        by_tier = dict.fromkeys(TIERS, 0)
        for held in self._held.values():
            by_tier[held.tier] = by_tier.get(held.tier, 0) + held.locked_bytes
        return by_tier

    def refresh_locked(self) -> int:
        """Measure again what each held file has locked, and return the total bytes.

        A truncate drops the locked pages of a file from every mapping without notice,
        so the recorded numbers go stale between cycles.
        """
        self._measure_all()
        return self.total_locked_bytes()

    def _measure_all(self) -> dict[FileKey, bytes]:
        """Measure every held file, and return the present flags of each mapping by key."""
        present_by_key = {}
        for key, held in self._held.items():
            present = self._present(held.addr, held.length_bytes)
            self._held[key] = replace(held, locked_bytes=present.count(1) * PAGE_SIZE)
            present_by_key[key] = present
        return present_by_key

    def _measure(self, addr: int, length_bytes: int) -> int:
        return self._present(addr, length_bytes).count(1) * PAGE_SIZE

    def _present(self, addr: int, length_bytes: int) -> bytes:
        """Return one byte per page of the mapping: 1 where the page is present.

        Locking is per folio: populating one page maps its fault-around window or its
        whole large folio. Reclaim cannot unmap a page mapped in a locked VMA, so the
        present pages of the locker's own mapping are the pages it holds.
        """
        # NOTE: a large folio that the mapping maps only in part is held whole but
        # counted by its mapped pages. It also lacks PG_mlocked, because Linux 6.18 sets
        # that at fault time only on small folios and on large folios mapped whole. A
        # fault maps a large folio whole only while its 2 MiB block has no page table.
        return present_file_pages(read_pagemap("self", addr, addr + length_bytes, self._procfs))

    def vma_count(self) -> int:
        """Return the number of VMAs of this process (lines of /proc/self/maps)."""
        with open(f"{self._procfs}/self/maps", "rb") as maps:
            return maps.read().count(b"\n")

    def _log_held(self, action: str, held: HeldFile) -> None:
        log.debug("%s %s pages=%d/%d size=%s tier=%s", action, held.path,
                  held.locked_bytes // PAGE_SIZE, held.length_bytes // PAGE_SIZE,
                  format_size(held.locked_bytes), held.tier)


def read_max_map_count(procfs: str = "/proc") -> int:
    """Return vm.max_map_count, or the kernel default when it cannot be read."""
    path = f"{procfs}/sys/vm/max_map_count"
    try:
        with open(path, "rb") as f:
            return int(f.read())
    except (OSError, ValueError) as exc:
        log.debug("reading %s failed, assuming %d: %s", path, DEFAULT_MAX_MAP_COUNT, exc)
        return DEFAULT_MAX_MAP_COUNT


def read_pmd_size(sysfs: str = "/sys") -> int:
    """Return the bytes one page table maps, as the kernel reports it for huge pages."""
    try:
        with open(f"{sysfs}/kernel/mm/transparent_hugepage/hpage_pmd_size", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _FALLBACK_PMD_SIZE


_PMD_SIZE = read_pmd_size()


def _mmap_aligned(fd: int, length_bytes: int, path: str) -> int:
    """Map length_bytes of fd from offset 0, on a page-table boundary where the filesystem allows.

    A fault maps a whole large folio, and so mlocks it, only when the folio does not
    cross a page-table boundary (2 MiB with 4 KiB pages) in the mapping. Otherwise it
    maps just the fault-around window: the folio then stays in memory, because reclaim
    cannot unmap it from a locked VMA, but without PG_mlocked, and the pagemap count
    misses its unmapped pages. With offset 0 at a boundary, no naturally aligned folio
    crosses one.
    """
    # Filesystems that use thp_get_unmapped_area (ext4 and xfs on Linux 6.18) place a
    # file mapping of at least one page table's span on a boundary. So a shorter file is
    # mapped at that span, and the tail beyond length_bytes is unmapped again.
    # NOTE: on other filesystems the mapping may stay unaligned. Large folios that cross
    # a boundary are then held but counted only by their mapped pages.
    span_bytes = max(length_bytes, _PMD_SIZE)
    addr = native.mmap_file(fd, span_bytes, path=path)
    if span_bytes > length_bytes:
        try:
            native.munmap(addr + length_bytes, span_bytes - length_bytes, path=path)
        except OSError:
            _munmap_quietly(addr, span_bytes, path)
            raise
    return addr


def _populate(addr: int, extents: Iterable[tuple[int, int]], path: str,
              should_stop: Callable[[], bool] | None = None) -> None:
    """Fault in and so lock the pages of extents in a lock-on-fault mapping at addr.

    Extents are populated in chunks of POPULATE_CHUNK_PAGES, so that a stop request
    waits for one chunk read from disk and not for a whole cold file.
    """
    for extent_first, extent_last in extents:
        for first in range(extent_first, extent_last, POPULATE_CHUNK_PAGES):
            if should_stop is not None and should_stop():
                raise _Skipped(REASON_STOPPING, release=True)
            last = min(first + POPULATE_CHUNK_PAGES, extent_last)
            _populate_range(addr + first * PAGE_SIZE, (last - first) * PAGE_SIZE, path)


def _populate_range(start: int, length_bytes: int, path: str) -> None:
    while True:
        try:
            native.madvise(start, length_bytes, native.MADV_POPULATE_READ, path=path)
            return
        except OSError as exc:
            # A signal interrupts the populate. The pages faulted in so far stay, so
            # the retry resumes quickly.
            if exc.errno == errno.EINTR:
                continue
            if exc.errno in _POPULATE_CHANGED_ERRNOS:
                raise _FileChanged() from None
            raise


def _missing_extents(present: bytes, extents: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Return the page ranges inside extents whose pages are not present.

    Pages past the end of present (beyond the mapping) count as missing.
    """
    missing = []
    for first, last in extents:
        window = present[first:last].ljust(last - first, b"\x00")
        absent = window.translate(_INVERT_FLAGS)
        missing.extend((first + start, first + end) for start, end in runs(absent))
    return tuple(missing)


_INVERT_FLAGS = bytes([1, 0]) + bytes(254)


def _round_up_to_page(size_bytes: int) -> int:
    return -(-size_bytes // PAGE_SIZE) * PAGE_SIZE


def _munmap_quietly(addr: int, length_bytes: int, path: str) -> None:
    """Undo a mapping made in this apply; a failure is logged, because the caller is already failing."""
    try:
        native.munmap(addr, length_bytes, path=path)
    except OSError as exc:
        log.error("unmapping %s failed: %s", path, exc)
