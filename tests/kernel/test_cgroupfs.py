"""Tests of creating, filling and removing memory cgroups on the real kernel (root).

Every cgroup is created below this process's own memory cgroup (v1) or the root (v2),
holds only processes the test starts, and is removed at teardown.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from prelock import cgroupfs, procfs
from prelock.bench import parent_cgroup

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def child_name(request) -> Iterator[str]:
    name = f"prelock-test-{os.getpid()}-{request.node.name}"[:80]
    yield name


def cleanup(controller: cgroupfs.MemoryController, path: str) -> None:
    cgroupfs.remove_cgroup(controller, path, timeout_s=5.0)


def start_sleeper(started: list[subprocess.Popen]) -> subprocess.Popen:
    process = subprocess.Popen(["sleep", "60"])
    started.append(process)
    return process


def test_create_sets_limit(controller, child_name):
    parent = parent_cgroup(controller)
    path = cgroupfs.create_memory_cgroup(controller, parent, child_name, 64 * MiB)
    try:
        assert controller.directory(path).is_dir()
        memory = cgroupfs.read_memory(controller, path)
        assert memory is not None
        assert memory.limit_bytes == 64 * MiB
        assert memory.oom_kills == 0
        assert cgroupfs.list_processes(controller, path) == []
    finally:
        cleanup(controller, path)
    assert not controller.directory(path).exists()


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_create_rejects_invalid_name(controller, name):
    with pytest.raises(ValueError, match="invalid cgroup name"):
        cgroupfs.create_memory_cgroup(controller, parent_cgroup(controller), name, 64 * MiB)


def test_create_existing_name_fails(controller, child_name):
    parent = parent_cgroup(controller)
    path = cgroupfs.create_memory_cgroup(controller, parent, child_name, 64 * MiB)
    try:
        with pytest.raises(FileExistsError):
            cgroupfs.create_memory_cgroup(controller, parent, child_name, 64 * MiB)
    finally:
        cleanup(controller, path)


def test_add_process_moves_it(controller, child_name, started):
    sleeper = start_sleeper(started)
    with cgroupfs.memory_cgroup(controller, parent_cgroup(controller), child_name, 64 * MiB) as path:
        cgroupfs.add_process(controller, path, sleeper.pid)
        assert cgroupfs.list_processes(controller, path) == [sleeper.pid]
        assert procfs.memory_cgroup_path(procfs.read_cgroup(sleeper.pid)) == path
        sleeper.kill()
        sleeper.wait()


def test_remove_busy_cgroup_names_pids(controller, child_name, started):
    sleeper = start_sleeper(started)
    path = cgroupfs.create_memory_cgroup(controller, parent_cgroup(controller), child_name, 64 * MiB)
    try:
        cgroupfs.add_process(controller, path, sleeper.pid)
        with pytest.raises(OSError) as raised:
            cgroupfs.remove_cgroup(controller, path, timeout_s=0.2)
        assert raised.value.errno == errno.EBUSY
        assert str(sleeper.pid) in str(raised.value)
    finally:
        sleeper.kill()
        sleeper.wait()
        cleanup(controller, path)


def test_remove_waits_for_reaped_process(controller, child_name, started):
    sleeper = start_sleeper(started)
    path = cgroupfs.create_memory_cgroup(controller, parent_cgroup(controller), child_name, 64 * MiB)
    cgroupfs.add_process(controller, path, sleeper.pid)
    os.kill(sleeper.pid, signal.SIGKILL)
    sleeper.wait()
    cgroupfs.remove_cgroup(controller, path, timeout_s=5.0)
    assert not controller.directory(path).exists()


def test_remove_missing_cgroup_is_not_error(controller, child_name):
    cgroupfs.remove_cgroup(controller, f"{parent_cgroup(controller).rstrip('/')}/{child_name}-absent")


def test_context_manager_removes_after_exception(controller, child_name):
    with pytest.raises(RuntimeError, match="inside"):
        with cgroupfs.memory_cgroup(controller, parent_cgroup(controller), child_name, 64 * MiB) as path:
            raise RuntimeError("inside the block")
    assert not controller.directory(path).exists()


def test_limit_triggers_oom_kill(controller, child_name, started):
    # A child that joins the cgroup and then touches 128 MiB of anonymous memory under
    # a 32 MiB limit, with no file pages to reclaim, is OOM-killed.
    with cgroupfs.memory_cgroup(controller, parent_cgroup(controller), child_name, 32 * MiB) as path:
        procs_file = controller.directory(path) / "cgroup.procs"
        code = (f"import os; open({str(procs_file)!r}, 'w').write(str(os.getpid()))\n"
                "chunks = [b'x' * (1 << 20) for _ in range(128)]\n")
        child = subprocess.Popen([sys.executable, "-c", code])
        started.append(child)
        assert child.wait(timeout=60) == -signal.SIGKILL
        memory = cgroupfs.read_memory(controller, path)
        assert memory is not None
        assert memory.oom_kills == 1
