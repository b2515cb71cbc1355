"""Tests of prelock.files against files that processes started here really map."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import procs
from prelock import files, native, procfs

pytestmark = pytest.mark.root

FILE_SIZE_BYTES = 4 * native.PAGE_SIZE
BLOCKED_OPEN_LIMIT_S = 10

# Creates a memfd, maps it shared, prints "ready" and waits for a signal.
MEMFD_PROGRAM = """
import mmap, os, signal
fd = os.memfd_create("prelock-test")
os.ftruncate(fd, 16384)
mapped = mmap.mmap(fd, 16384)
print("ready", flush=True)
signal.pause()
"""

# Mounts a tmpfs at $1 in the private mount namespace that unshare created, writes a file
# there and maps it with the map_file program ($2).
TMPFS_SCRIPT = ('mount -t tmpfs -o size=1m prelock-test "$1" '
                '&& head -c 16384 /dev/zero > "$1/data.bin" && exec "$2" -n "$1/data.bin"')


def write_file(path: Path, fill: bytes = b"\x01") -> files.FileKey:
    path.write_bytes(fill * FILE_SIZE_BYTES)
    return files.file_key(os.stat(path))


def find_mapping(pid: int, key: files.FileKey) -> procfs.Mapping:
    matches = [mapping for mapping in procfs.read_maps(pid) if (mapping.dev, mapping.inode) == key]
    assert matches, f"no mapping of file key {key} in /proc/{pid}/maps"
    return matches[0]


def find_mapping_by_path(pid: int, path: str) -> procfs.Mapping:
    matches = [mapping for mapping in procfs.read_maps(pid) if mapping.path == path]
    assert matches, f"no mapping of {path!r} in /proc/{pid}/maps"
    return matches[0]


@contextlib.contextmanager
def open_mapped(pid: int, mapping: procfs.Mapping) -> Iterator[files.OpenedFile]:
    opened = files.open_mapped_file(pid, mapping)
    try:
        yield opened
    finally:
        os.close(opened.fd)


def key_via_root(pid: int, mapping: procfs.Mapping) -> files.FileKey:
    fd = files._open_via_root(pid, mapping, "/proc")
    try:
        return files.file_key(os.fstat(fd))
    finally:
        os.close(fd)


class OpenBlocked(Exception):
    """An open() did not return. Not an OSError, so no `except OSError` can swallow it."""


@contextlib.contextmanager
def fail_if_blocked(limit_s: int = BLOCKED_OPEN_LIMIT_S) -> Iterator[None]:
    """Turn an open() that blocks into a failure instead of a hung test run.

    SIGALRM interrupts the blocked open, and the handler's exception ends the retry
    that Python would otherwise make after EINTR.
    """
    def on_alarm(signum, frame):
        raise OpenBlocked(f"open() still blocked after {limit_s} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit_s)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def replace_by_rename(path: Path) -> files.FileKey:
    """Write a new file next to path and rename it over path, as package upgrades do."""
    new_path = path.with_name(path.name + ".new")
    new_key = write_file(new_path, fill=b"\x02")
    os.rename(new_path, path)
    return new_key


# --- map_files route --------------------------------------------------------------

def test_map_files_normal_file(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        mapping = find_mapping(child.pid, key)
        with open_mapped(child.pid, mapping) as opened:
            assert opened.via == "map_files"
            assert opened.key == key
            assert opened.size_bytes == FILE_SIZE_BYTES
            assert stat.S_ISREG(os.fstat(opened.fd).st_mode)


def test_map_files_deleted_file(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        path.unlink()
        mapping = find_mapping(child.pid, key)
        assert mapping.path == f"{path} (deleted)"
        with open_mapped(child.pid, mapping) as opened:
            assert opened.via == "map_files"
            assert opened.key == key
            assert os.fstat(opened.fd).st_nlink == 0


def test_map_files_name_ending_deleted(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "x (deleted)"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        mapping = find_mapping(child.pid, key)
        assert mapping.path == str(path)
        with open_mapped(child.pid, mapping) as opened:
            assert opened.via == "map_files"
            assert opened.key == key
            assert os.fstat(opened.fd).st_nlink == 1


def test_map_files_after_replace(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    old_key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        new_key = replace_by_rename(path)
        mapping = find_mapping(child.pid, old_key)
        with open_mapped(child.pid, mapping) as opened:
            assert opened.key == old_key
            assert opened.key != new_key


def test_map_files_process_gone(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        mapping = find_mapping(child.pid, key)
    with pytest.raises(files.FileSkipped, match="^mapping gone$"):
        files.open_mapped_file(child.pid, mapping)


# --- files in memory are skipped --------------------------------------------------

def test_skip_private_tmpfs(disk_dir: Path, map_file_program: Path):
    mount_dir = disk_dir / "mnt"
    mount_dir.mkdir()
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", TMPFS_SCRIPT, "sh",
            mount_dir, map_file_program]

    with procs.spawn(argv, ready_line="ready") as child:
        # The tmpfs exists only in the child's mount namespace.
        assert not os.path.ismount(mount_dir)
        mapping = find_mapping_by_path(child.pid, f"{mount_dir}/data.bin")
        with pytest.raises(files.FileSkipped, match="^on tmpfs$"):
            files.open_mapped_file(child.pid, mapping)


def test_skip_dev_shm(map_file_program: Path):
    with tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="prelock-test-") as shm_file:
        shm_file.write(b"\x01" * FILE_SIZE_BYTES)
        shm_file.flush()
        key = files.file_key(os.fstat(shm_file.fileno()))

        with procs.spawn([map_file_program, "-n", shm_file.name], ready_line="ready") as child:
            mapping = find_mapping(child.pid, key)
            with pytest.raises(files.FileSkipped, match="^on tmpfs$"):
                files.open_mapped_file(child.pid, mapping)


def test_skip_memfd():
    with procs.spawn([sys.executable, "-c", MEMFD_PROGRAM], ready_line="ready") as child:
        mapping = find_mapping_by_path(child.pid, "/memfd:prelock-test (deleted)")
        assert files.path_skip_reason(mapping) == "in-memory or device file"
        with pytest.raises(files.FileSkipped, match="^on tmpfs$"):
            files.open_mapped_file(child.pid, mapping)


# --- /proc/PID/root fallback ------------------------------------------------------

def test_root_accepts_original(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        mapping = find_mapping(child.pid, key)
        assert key_via_root(child.pid, mapping) == key


def test_root_reaches_other_mount_namespace(disk_dir: Path, map_file_program: Path):
    mount_dir = disk_dir / "mnt"
    mount_dir.mkdir()
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", TMPFS_SCRIPT, "sh",
            mount_dir, map_file_program]

    with procs.spawn(argv, ready_line="ready") as child:
        mapping = find_mapping_by_path(child.pid, f"{mount_dir}/data.bin")
        assert not (mount_dir / "data.bin").exists()
        assert key_via_root(child.pid, mapping) == (mapping.dev, mapping.inode)


def test_root_rejects_replaced_stale_path(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        # maps was read before the replacement, so the path has no " (deleted)" suffix.
        mapping = find_mapping(child.pid, key)
        new_key = replace_by_rename(path)
        assert new_key != key
        assert mapping.path == str(path)
        with pytest.raises(files.FileSkipped):
            files._open_via_root(child.pid, mapping, "/proc")


def test_root_rejects_replaced_deleted_path(disk_dir: Path, map_file_program: Path):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        replace_by_rename(path)
        mapping = find_mapping(child.pid, key)
        assert mapping.path == f"{path} (deleted)"
        with pytest.raises(files.FileSkipped):
            files._open_via_root(child.pid, mapping, "/proc")


def test_root_tells_deleted_from_named_deleted(disk_dir: Path, map_file_program: Path):
    named_path = disk_dir / "x (deleted)"
    deleted_path = disk_dir / "x"
    named_key = write_file(named_path)
    deleted_key = write_file(deleted_path)

    with procs.spawn([map_file_program, "-n", named_path], ready_line="ready") as named, \
            procs.spawn([map_file_program, "-n", deleted_path], ready_line="ready") as deleted:
        deleted_path.unlink()
        named_mapping = find_mapping(named.pid, named_key)
        deleted_mapping = find_mapping(deleted.pid, deleted_key)
        # Both lines of maps print the same path text.
        assert named_mapping.path == deleted_mapping.path
        assert key_via_root(named.pid, named_mapping) == named_key
        with pytest.raises(files.FileSkipped):
            files._open_via_root(deleted.pid, deleted_mapping, "/proc")


def test_open_flags_nonblocking():
    assert files.OPEN_FLAGS & os.O_NONBLOCK
    assert files.OPEN_FLAGS & os.O_NOCTTY
    assert files.OPEN_FLAGS & os.O_ACCMODE == os.O_RDONLY


@pytest.mark.parametrize("deleted_suffix", [False, True], ids=["stale-path", "deleted-path"])
def test_root_rejects_fifo(disk_dir: Path, map_file_program: Path, deleted_suffix: bool):
    path = disk_dir / "lib.so"
    key = write_file(path)

    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as child:
        stale_mapping = find_mapping(child.pid, key)
        path.unlink()
        # A FIFO with no writer: a blocking open for reading would wait for one forever.
        os.mkfifo(path)
        mapping = find_mapping(child.pid, key) if deleted_suffix else stale_mapping
        assert mapping.path.endswith(" (deleted)") == deleted_suffix
        with fail_if_blocked(), pytest.raises(files.FileSkipped):
            files._open_via_root(child.pid, mapping, "/proc")
