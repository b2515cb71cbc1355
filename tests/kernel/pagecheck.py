"""Independent readers of /proc/PID/maps, pagemap and /proc/kpageflags for assertions.

These deliberately share no code with prelock, so a test compares prelock's numbers with
the kernel's and not with prelock's own parsing.
"""

from __future__ import annotations

import os
import struct

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PRESENT = 1 << 63
FILE_PAGE = 1 << 61
PFN_MASK = (1 << 55) - 1
KPF_MLOCKED = 1 << 33


def code_mappings(pid: int) -> list[tuple[int, int, int, tuple[int, int], str]]:
    """Return (start, end, file_offset, (dev, inode), path) of the read-only mappings of
    files that pid maps executable at least once."""
    rows = []
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 6 or int(fields[4]) == 0 or not fields[5].startswith(b"/"):
                continue
            start, end = (int(x, 16) for x in fields[0].split(b"-"))
            major, minor = (int(x, 16) for x in fields[3].split(b":"))
            rows.append((start, end, fields[1].decode(), int(fields[2], 16),
                         (os.makedev(major, minor), int(fields[4])), fields[5].rstrip(b"\n").decode()))
    executable = {row[4] for row in rows if row[2][2] == "x"}
    return [(start, end, offset, key, path) for start, end, perms, offset, key, path in rows
            if key in executable and perms[0] == "r" and perms[1] != "w"
            and not path.startswith(("/dev/", "/memfd:"))]


def pagemap_entries(pid: int, start: int, end: int) -> list[int]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE_SIZE * 8)
        data = f.read((end - start) // PAGE_SIZE * 8)
    return list(struct.unpack(f"{len(data) // 8}Q", data))


def present_code_pages(pids: list[int]) -> dict[tuple[int, int], set[int]]:
    """Return, per file key, the file page indexes present (file-backed) in the pids' page tables."""
    pages: dict[tuple[int, int], set[int]] = {}
    for pid in pids:
        for start, end, offset, key, _path in code_mappings(pid):
            size_pages = -(-os.stat(f"/proc/{pid}/map_files/{start:x}-{end:x}").st_size // PAGE_SIZE)
            entries = pagemap_entries(pid, start, end)
            found = pages.setdefault(key, set())
            for index, entry in enumerate(entries):
                file_page = offset // PAGE_SIZE + index
                if entry & PRESENT and entry & FILE_PAGE and file_page < size_pages:
                    found.add(file_page)
    return pages


def count_mlocked(pfns: list[int]) -> int:
    """Return how many of pfns have PG_mlocked set in /proc/kpageflags."""
    locked = 0
    with open("/proc/kpageflags", "rb") as f:
        for pfn in pfns:
            f.seek(pfn * 8)
            (flags,) = struct.unpack("Q", f.read(8))
            locked += bool(flags & KPF_MLOCKED)
    return locked


def mlocked_counts(pids: list[int]) -> tuple[int, int]:
    """Return (mlocked, present) counts over the present file-backed code pages of pids.

    Private copy-on-write pages are anonymous (no FILE_PAGE bit) and are left out.
    """
    pfns = []
    for pid in pids:
        for start, end, _offset, _key, _path in code_mappings(pid):
            for entry in pagemap_entries(pid, start, end):
                if entry & PRESENT and entry & FILE_PAGE and entry & PFN_MASK:
                    pfns.append(entry & PFN_MASK)
    return count_mlocked(pfns), len(pfns)


def file_pages_mlocked(path: str, holder_pid: int) -> tuple[int, int]:
    """Return (mlocked, present) over the pages of path mapped in holder_pid's page tables."""
    real = os.path.realpath(path)
    st = os.stat(real)
    pfns = []
    with open(f"/proc/{holder_pid}/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and int(fields[4]) == st.st_ino:
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                for entry in pagemap_entries(holder_pid, start, end):
                    if entry & PRESENT and entry & PFN_MASK:
                        pfns.append(entry & PFN_MASK)
    return count_mlocked(pfns), len(pfns)
