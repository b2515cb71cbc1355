"""Page-cache residency of one open file: cachestat(2) where the kernel has it, mincore(2) otherwise.

Both backends count the same thing, the pages of [0, size) that are in the page cache.
cachestat also returns dirty, writeback and evicted counts; with mincore those are None.
Neither backend reads a byte of the file, so a file truncated meanwhile cannot raise SIGBUS.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
from dataclasses import dataclass

from prelock import native
from prelock.files import OPEN_FLAGS, FileSkipped

BACKENDS = ("cachestat", "mincore")

# mincore maps the file in windows so that a huge file needs neither a huge mapping nor a
# huge vector (one byte per page: 256 KiB per 1 GiB window).
MINCORE_WINDOW_BYTES = 1 << 30

CAP_FOWNER = 3
CAP_SYS_ADMIN = 21

# mincore's vector byte has bit 0 set for a resident page; the other bits are reserved.
_RESIDENT_TABLE = bytes(b & 1 for b in range(256))

UNKNOWN_MINCORE = ("residency unknown: mincore(2) reports every page resident when the caller "
                   "neither owns nor may write the file (Linux 5.2+); run as root or as the owner")
UNKNOWN_CACHESTAT = ("residency unknown: cachestat(2) is denied when the caller neither owns "
                     "nor may write the file; run as root or as the owner")


@dataclass(frozen=True, slots=True)
class Residency:
    """Page-cache counts of one file, in pages of native.PAGE_SIZE.

    cached_pages is None when the kernel does not reveal residency to this caller, and
    then unknown_reason gives the cause. The dirty, writeback and evicted counts are None with
    the mincore backend.
    """

    size_bytes: int
    pages: int
    cached_pages: int | None
    dirty_pages: int | None = None
    writeback_pages: int | None = None
    evicted_pages: int | None = None
    recently_evicted_pages: int | None = None
    unknown_reason: str | None = None


def default_backend() -> str:
    return "cachestat" if native.has_cachestat() else "mincore"


def page_count(size_bytes: int) -> int:
    return (size_bytes + native.PAGE_SIZE - 1) // native.PAGE_SIZE


def open_regular_file(path: str) -> tuple[int, os.stat_result]:
    """Open path read-only without blocking and return (fd, fstat); the caller closes fd.

    Raises FileSkipped for anything but a regular file. stat() checks the type before
    the open, so a FIFO or device found there is not opened. fstat() checks it again
    after the open because the path may have been replaced in between, and O_NONBLOCK
    keeps such an open from blocking. OSError from stat or open reaches the caller.
    """
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise FileSkipped(f"not a regular file ({_file_type(before.st_mode)})")

    fd = os.open(path, OPEN_FLAGS)
    try:
        after = os.fstat(fd)
        if not stat.S_ISREG(after.st_mode):
            raise FileSkipped(f"replaced by a {_file_type(after.st_mode)} while opening")
    except BaseException:
        os.close(fd)
        raise
    return fd, after


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def measure(fd: int, st: os.stat_result, backend: str, path: str | None = None) -> Residency:
    """Count the cached pages of the open regular file fd, whose fstat is st.

    Raises OSError when a syscall fails for a reason other than the permission checks
    that hide residency; those return a Residency with cached_pages None.
    """
    size_bytes = st.st_size
    if size_bytes == 0:
        # cachestat with length 0 means "to the end of the file", and mmap rejects an
        # empty length, so an empty file gets zero counts without a syscall.
        zero = 0 if backend == "cachestat" else None
        return Residency(0, 0, 0, zero, zero, zero, zero)
    if backend == "cachestat":
        return _measure_cachestat(fd, size_bytes, path)
    if backend == "mincore":
        return _measure_mincore(fd, st, path)
    raise ValueError(f"invalid backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def _measure_cachestat(fd: int, size_bytes: int, path: str | None) -> Residency:
    pages = page_count(size_bytes)
    try:
        # The range ends at the size from fstat, not at the current end of the file (length
        # 0), so Cached never exceeds Pages when the file grows meanwhile.
        counts = native.cachestat(fd, 0, size_bytes, path)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return Residency(size_bytes, pages, None, unknown_reason=UNKNOWN_CACHESTAT)
        raise
    return Residency(size_bytes, pages, counts.cache, counts.dirty, counts.writeback,
                     counts.evicted, counts.recently_evicted)


def _measure_mincore(fd: int, st: os.stat_result, path: str | None) -> Residency:
    size_bytes = st.st_size
    pages = page_count(size_bytes)
    if not mincore_is_truthful(fd, st):
        return Residency(size_bytes, pages, None, unknown_reason=UNKNOWN_MINCORE)

    cached_pages = 0
    for offset in range(0, size_bytes, MINCORE_WINDOW_BYTES):
        length = min(MINCORE_WINDOW_BYTES, size_bytes - offset)
        addr = native.mmap_file(fd, length, offset, path)
        try:
            vector = native.mincore(addr, length, path)
        finally:
            native.munmap(addr, length, path)
        cached_pages += vector.translate(_RESIDENT_TABLE).count(1)
    return Residency(size_bytes, pages, cached_pages)


def mincore_is_truthful(fd: int, st: os.stat_result) -> bool:
    """Check whether mincore(2) on a mapping of fd reports real residency to this caller.

    Since Linux 5.2, mincore on a file mapping reports every page resident unless the
    caller owns the file, has CAP_FOWNER, or may write it (on a writable mount). This
    stops callers from probing the page cache of other users' files.
    """
    if st.st_uid == os.geteuid() or has_capability(CAP_FOWNER):
        return True
    # access() through /proc/self/fd checks the open file itself; AT_EACCESS makes it use
    # the effective IDs like the kernel's check does, and a read-only mount fails with EROFS.
    return os.access(f"/proc/self/fd/{fd}", os.W_OK, effective_ids=True)


@functools.cache
def has_capability(capability: int) -> bool:
    """Check CapEff in /proc/self/status for capability; the result is cached per process."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> capability & 1)
    return False

