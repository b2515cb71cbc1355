"""Opening the file behind a mapping of another process, safely.

/proc/PID/map_files/<start>-<end> opens the very file the process mapped, also when it
was deleted or lives in another mount namespace or chroot; it needs CAP_SYS_ADMIN or
CAP_CHECKPOINT_RESTORE. Without them, /proc/PID/root/<path> is the fallback, accepted
only when its (st_dev, st_ino) equals the mapping's, because the path is printed
relative to the reader's root and may name a different file now.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from prelock import native
from prelock.procfs import DELETED_SUFFIX, Mapping

FileKey = tuple[int, int]

# O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer appears.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

# Filesystems whose pages live only in memory: locking them gains nothing without swap,
# and populating a sparse range of them allocates it.
MEMORY_FS_MAGICS = {
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x958458F6: "hugetlbfs",
}

_MEMORY_PATH_PREFIXES = ("/memfd:", "/dev/shm/", "/SYSV", "/dev/", "/anon_hugepage")


class FileSkipped(Exception):
    """The mapped file is not lockable or not reachable; str(exc) is the reason."""


@dataclass(frozen=True, slots=True)
class OpenedFile:
    fd: int
    key: FileKey
    size_bytes: int
    via: str  # "map_files" or "root"


def file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino)


def path_skip_reason(mapping: Mapping) -> str | None:
    """Return why a mapping cannot be a lockable file judging by maps alone, else None."""
    if not mapping.file_backed or mapping.path.startswith("["):
        return "not a file mapping"
    if mapping.path.startswith(_MEMORY_PATH_PREFIXES):
        return "in-memory or device file"
    if not mapping.path.startswith("/"):
        return "not a file mapping"
    return None


def open_file_by_path(path: str, key: FileKey) -> OpenedFile:
    """Open the regular file at path only if it still has key; the caller closes fd."""
    fd = _open_if_key(path, key)
    if fd is None:
        raise FileSkipped("the path names another file now, or none")
    return _checked(fd, "path")


def open_mapped_file(pid: int, mapping: Mapping, procfs: str = "/proc") -> OpenedFile:
    """Open the regular file behind mapping in pid; the caller closes fd.

    Raises FileSkipped with the reason when the file is not a regular file on a
    disk-backed filesystem, or when neither route can reach it.
    """
    fd, via = _open_either_route(pid, mapping, procfs)
    return _checked(fd, via)


def _checked(fd: int, via: str) -> OpenedFile:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileSkipped("not a regular file")
        fs_name = MEMORY_FS_MAGICS.get(native.fstatfs_type(fd))
        if fs_name is not None:
            raise FileSkipped(f"on {fs_name}")
    except BaseException:
        os.close(fd)
        raise
    return OpenedFile(fd, file_key(st), st.st_size, via)


def _open_either_route(pid: int, mapping: Mapping, procfs: str) -> tuple[int, str]:
    try:
        return os.open(f"{procfs}/{pid}/map_files/{mapping.map_files_name}", OPEN_FLAGS), "map_files"
    except FileNotFoundError:
        raise FileSkipped("mapping gone") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            raise FileSkipped(f"open failed: {exc.strerror}") from None
    return _open_via_root(pid, mapping, procfs), "root"


def _open_via_root(pid: int, mapping: Mapping, procfs: str) -> int:
    candidates = [mapping.path]
    if mapping.path.endswith(DELETED_SUFFIX):
        candidates.append(mapping.path[: -len(DELETED_SUFFIX)])
    for path in candidates:
        fd = _open_if_key(f"{procfs}/{pid}/root{path}", (mapping.dev, mapping.inode))
        if fd is not None:
            return fd
    raise FileSkipped("no map_files access and the path names another file now (deleted or replaced)")


def _open_if_key(path: str, key: FileKey) -> int | None:
    """Open path for reading if it is a regular file with key, else return None."""
    # O_PATH opens nothing: a device or FIFO now at the path is checked before any real
    # open, which for some devices has side effects.
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(path_fd)
        if stat.S_ISREG(st.st_mode) and file_key(st) == key:
            return os.open(f"/proc/self/fd/{path_fd}", OPEN_FLAGS)
    except OSError:
        pass
    finally:
        os.close(path_fd)
    return None
