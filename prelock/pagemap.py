"""Page presence from /proc/PID/pagemap and page flags from /proc/kpageflags.

pagemap contains one little-endian u64 per virtual page: bit 63 present, bit 62 swapped,
bit 61 file page or shared anonymous, bits 0-54 the PFN (zero without CAP_SYS_ADMIN).
kpageflags contains one u64 of KPF_* bits per PFN; bit 33 (KPF_MLOCKED) is the ground
truth for "this page is locked".
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from prelock.errors import translate_proc_error

ENTRY_BYTES = 8
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
KPF_UNEVICTABLE = 18
KPF_MLOCKED = 33

# Bits 63 (present) and 61 (file page) sit in the top byte of each entry as 0x80 and
# 0x20. A private copy-on-write page is present but anonymous, so it lacks 0x20.
_PRESENT_FILE_TABLE = bytes(1 if (b & 0xA0) == 0xA0 else 0 for b in range(256))
_RUN_RE = re.compile(rb"\x01+")


def open_pagemap(pid: int | str, procfs: str = "/proc") -> int:
    """Open pid's pagemap (pid may be "self"); the caller closes the fd."""
    path = f"{procfs}/{pid}/pagemap"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise translate_proc_error(exc, int(pid) if str(pid).isdigit() else 0, path) from exc


def read_entries(fd: int, start: int, end: int) -> bytes:
    """Read the raw entries for virtual addresses [start, end) from an open pagemap."""
    return _pread_all(fd, (end - start) // PAGE_SIZE * ENTRY_BYTES, start // PAGE_SIZE * ENTRY_BYTES)


def read_pagemap(pid: int | str, start: int, end: int, procfs: str = "/proc") -> bytes:
    """Read the raw pagemap entries for virtual addresses [start, end) of pid."""
    fd = open_pagemap(pid, procfs)
    try:
        return read_entries(fd, start, end)
    finally:
        os.close(fd)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def present_file_pages(raw: bytes) -> bytes:
    """Return one byte per page: 1 where the page is present and file-backed, else 0."""
    return raw[ENTRY_BYTES - 1::ENTRY_BYTES].translate(_PRESENT_FILE_TABLE)


def runs(flags: bytes) -> list[tuple[int, int]]:
    """Return the [first, last) index ranges where flags is 1."""
    return [match.span() for match in _RUN_RE.finditer(flags)]


def pfns(raw: bytes) -> list[int]:
    """Return the PFN of each entry (0 when absent or hidden from this reader)."""
    entries = memoryview(raw).cast("Q")
    return [entry & PFN_MASK if entry >> 63 else 0 for entry in entries]


def read_kpageflags(pfn_list: Iterable[int], procfs: str = "/proc") -> dict[int, int]:
    """Return the KPF_* flags of each nonzero PFN, reading adjacent PFNs in one pread."""
    wanted = sorted({pfn for pfn in pfn_list if pfn})
    flags: dict[int, int] = {}
    if not wanted:
        return flags
    fd = os.open(f"{procfs}/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for first, last in _pfn_ranges(wanted):
            data = _pread_all(fd, (last - first) * ENTRY_BYTES, first * ENTRY_BYTES)
            values = memoryview(data).cast("Q")
            for index, value in enumerate(values):
                flags[first + index] = value
    finally:
        os.close(fd)
    return {pfn: flags.get(pfn, 0) for pfn in wanted}


def _pfn_ranges(sorted_pfns: list[int], max_gap: int = 64) -> list[tuple[int, int]]:
    """Group sorted PFNs into [first, last) ranges, bridging gaps up to max_gap pages."""
    ranges = []
    first = previous = sorted_pfns[0]
    for pfn in sorted_pfns[1:]:
        if pfn - previous > max_gap:
            ranges.append((first, previous + 1))
            first = pfn
        previous = pfn
    ranges.append((first, previous + 1))
    return ranges


def is_mlocked(kpageflags: int) -> bool:
    return bool(kpageflags >> KPF_MLOCKED & 1)
