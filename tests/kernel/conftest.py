"""Fixtures of the kernel tests: real programs (sshd, containerd, small C programs) run as
root, a directory on a disk-backed filesystem and the memory cgroup controller.

Test modules in this directory import the helpers as `import procs`: pytest puts
this directory on sys.path because it has no __init__.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import procs
from prelock import cgroupfs, files, native


def require_root() -> None:
    # Fixtures check too, so a test that lacks the `root` marker is skipped with
    # the same reason instead of failing halfway through a start.
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[procs.SshdProcess]:
    """A real /usr/sbin/sshd listening on a free port of 127.0.0.1."""
    require_root()
    with procs.run_sshd(tmp_path) as process:
        yield process


@pytest.fixture
def containerd() -> Iterator[procs.ContainerdProcess]:
    """A real /usr/bin/containerd with private root, state and sockets."""
    require_root()
    # A short directory, because a unix socket path is limited to 107 bytes and
    # pytest's tmp_path grows with the test name.
    with tempfile.TemporaryDirectory(prefix="prelock-ctrd-") as work_dir:
        with procs.run_containerd(Path(work_dir)) as process:
            yield process


@pytest.fixture
def map_file_program() -> Path:
    """Path of a compiled program: `map_file [-x] [-n] FILE` maps FILE, prints "ready", waits."""
    return procs.build_map_file_program()


def is_memory_fs(path: Path) -> bool:
    """Return whether the directory at path is on tmpfs, ramfs or hugetlbfs."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return native.fstatfs_type(fd) in files.MEMORY_FS_MAGICS
    finally:
        os.close(fd)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk-backed filesystem: tmp_path, or one in /var/tmp if that is tmpfs.

    prelock skips files on memory filesystems, and locking or evicting their pages would
    test nothing.
    """
    if not is_memory_fs(tmp_path):
        yield tmp_path
        return
    if is_memory_fs(Path("/var/tmp")):
        pytest.fail(f"{tmp_path} and /var/tmp are both in memory: set TMPDIR to a disk-backed "
                    "directory to run these tests")
    work_dir = Path(tempfile.mkdtemp(prefix="prelock-disk-", dir="/var/tmp"))
    try:
        yield work_dir
    finally:
        shutil.rmtree(work_dir)


@pytest.fixture(scope="session")
def controller() -> cgroupfs.MemoryController:
    """The mounted memory cgroup controller, v1 or v2. A test that uses it is skipped without one."""
    found = cgroupfs.memory_controller()
    if found is None:
        pytest.skip("no memory cgroup controller is mounted (neither v1 memory nor cgroup2 with memory)")
    return found
