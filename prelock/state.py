"""The daemon's state directory: an exclusive lock, and JSON files replaced atomically."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path

from prelock.errors import PrelockError

LOCK_FILE = "lock"
# status.json and snapshot.json stay far below this even with 100,000 held files.
MAX_STATE_FILE_BYTES = 64 << 20


def acquire(state_dir: str | os.PathLike) -> int:
    """Create state_dir if needed and take its lock; return the lock fd, held until exit.

    Two daemons with one state_dir would lock the same pages twice and overwrite each
    other's status and snapshot, so the second one stops here.
    """
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PrelockError(f"state_dir {directory} exists and is not a directory: "
                           "remove it or set state_dir to a directory") from None
    except OSError as exc:
        raise PrelockError(f"cannot create state_dir {directory}: {exc.strerror}") from None

    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        raise PrelockError(f"cannot open {path}: {exc.strerror}: state_dir must be a writable directory "
                           "(set state_dir or fix its permissions)") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PrelockError(f"{path} is not a regular file: remove it so the daemon can create its lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise PrelockError(f"another prelock daemon (pid {owner}) uses state_dir {directory}: stop it, "
                               "or give this one another state_dir") from None
        raise PrelockError(f"cannot lock {path}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_json(path: Path, record: dict) -> None:
    """Replace path with record atomically: a reader sees the old or the new file whole."""
    temporary = path.with_name(path.name + ".tmp")
    # Whatever sits at the temporary name (a FIFO would block the open, a symlink would
    # redirect the write) is removed, and O_EXCL | O_NOFOLLOW create a new regular file.
    temporary.unlink(missing_ok=True)
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike) -> object:
    """Read a JSON state file; raises OSError (EINVAL for a FIFO or device) or ValueError.

    Opened with O_NONBLOCK and checked to be a regular file, because opening a FIFO
    would block until a writer appears.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = os.read(fd, MAX_STATE_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_FILE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_FILE_BYTES} bytes")
    return json.loads(data)
