"""The only module that calls the C core: each wrapper turns -errno into OSError.

Optional kernel features are probed once each and exposed as booleans; no code
parses kernel version strings to decide what the kernel has.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import NamedTuple

from prelock._native import ffi, lib

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
MLOCK_ONFAULT = 1

MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14+

# PROCMAP_QUERY query_flags and vma_flags (include/uapi/linux/fs.h, Linux 6.11+).
PROCMAP_QUERY_VMA_READABLE = 0x01
PROCMAP_QUERY_VMA_WRITABLE = 0x02
PROCMAP_QUERY_VMA_EXECUTABLE = 0x04
PROCMAP_QUERY_VMA_SHARED = 0x08
PROCMAP_QUERY_COVERING_OR_NEXT_VMA = 0x10
PROCMAP_QUERY_FILE_BACKED_VMA = 0x20


class CacheStat(NamedTuple):
    """Page counts from cachestat(2) for one byte range of a file."""

    cache: int
    dirty: int
    writeback: int
    evicted: int
    recently_evicted: int


class ProcmapEntry(NamedTuple):
    """One VMA as PROCMAP_QUERY returns it; name is the raw bytes the kernel prints."""

    start: int
    end: int
    flags: int
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    name: bytes


def _check(rc: int, what: str, path: str | None = None) -> int:
    if rc < 0:
        code = -rc
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
    return rc


def mlockall(flags: int) -> None:
    _check(lib.pl_mlockall(flags), "mlockall")


def munlockall() -> None:
    _check(lib.pl_munlockall(), "munlockall")


def mlock2(addr: int, length: int, flags: int = 0, path: str | None = None) -> None:
    _check(lib.pl_mlock2(addr, length, flags), "mlock2", path)


def munlock(addr: int, length: int, path: str | None = None) -> None:
    _check(lib.pl_munlock(addr, length), "munlock", path)


def mmap_file(fd: int, length: int, offset: int = 0, path: str | None = None) -> int:
    """Map length bytes of fd read-only and shared; return the address."""
    addr = ffi.new("uintptr_t *")
    _check(lib.pl_mmap_file(fd, length, offset, addr), "mmap", path)
    return int(addr[0])


def munmap(addr: int, length: int, path: str | None = None) -> None:
    _check(lib.pl_munmap(addr, length), "munmap", path)


def madvise(addr: int, length: int, advice: int, path: str | None = None) -> None:
    _check(lib.pl_madvise(addr, length, advice), "madvise", path)


def mincore(addr: int, length: int, path: str | None = None) -> bytes:
    """Return one byte per page of [addr, addr+length); bit 0 set means resident."""
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = ffi.new("unsigned char[]", max(pages, 1))
    _check(lib.pl_mincore(addr, length, vec), "mincore", path)
    return bytes(ffi.buffer(vec, pages))


def cachestat(fd: int, offset: int = 0, length: int = 0, path: str | None = None) -> CacheStat:
    """Return page-cache counts for [offset, offset+length) of fd; length 0 means to EOF."""
    out = ffi.new("struct pl_cachestat *")
    _check(lib.pl_cachestat(fd, offset, length, out), "cachestat", path)
    return CacheStat(out.nr_cache, out.nr_dirty, out.nr_writeback, out.nr_evicted, out.nr_recently_evicted)


def procmap_query(maps_fd: int, addr: int, flags: int = PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
                  path: str | None = None) -> ProcmapEntry | None:
    """Return the VMA covering addr (or the next one, with the default flags).

    Returns None once no VMA matches (ENOENT), which ends a walk over all VMAs.
    """
    name_buf = ffi.new("char[]", 4096)
    query = ffi.new("struct pl_procmap_query *")
    query.query_flags = flags
    query.query_addr = addr
    query.vma_name_addr = int(ffi.cast("uintptr_t", name_buf))
    query.vma_name_size = 4096

    rc = lib.pl_procmap_query(maps_fd, query)
    if rc == -errno.ENOENT:
        return None
    _check(rc, "PROCMAP_QUERY", path)

    # vma_name_size counts the terminating NUL; it is 0 for a VMA without a name.
    name = ffi.string(name_buf, query.vma_name_size) if query.vma_name_size else b""
    return ProcmapEntry(query.vma_start, query.vma_end, query.vma_flags, query.vma_offset,
                        query.dev_major, query.dev_minor, query.inode, name)


def fstatfs_type(fd: int, path: str | None = None) -> int:
    """Return f_type of the filesystem holding fd (TMPFS_MAGIC and so on)."""
    out = ffi.new("int64_t *")
    _check(lib.pl_fstatfs_type(fd, out), "fstatfs", path)
    return int(out[0])


@functools.cache
def has_cachestat() -> bool:
    """Probe once for cachestat(2) (Linux 6.5+)."""
    # An invalid fd gets EBADF from a kernel that has the syscall and ENOSYS otherwise;
    # a seccomp filter that blocks it shows up as EPERM.
    rc = lib.pl_cachestat(-1, 0, 0, ffi.new("struct pl_cachestat *"))
    return rc not in (-errno.ENOSYS, -errno.EPERM)


@functools.cache
def has_populate_read() -> bool:
    """Probe once whether madvise accepts MADV_POPULATE_READ (Linux 5.14+)."""
    # madvise validates the advice before the range, and an empty range is a no-op,
    # so an unknown advice fails with EINVAL and a known one returns 0.
    return lib.pl_madvise(0, 0, MADV_POPULATE_READ) == 0


@functools.cache
def has_procmap_query() -> bool:
    """Probe once whether /proc/PID/maps supports the PROCMAP_QUERY ioctl (Linux 6.11+)."""
    fd = os.open("/proc/self/maps", os.O_RDONLY | os.O_CLOEXEC)
    try:
        procmap_query(fd, 0)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True
