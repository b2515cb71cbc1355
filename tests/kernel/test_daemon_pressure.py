"""`prelock run` under memory pressure: the locked working set survives, the hog dies.

A target maps a file-backed working set and touches every page of it; a hog then
allocates anonymous memory. Both run in a memory cgroup limited to 512 MiB that the
test creates, under the test's own cgroup, and the daemon runs outside it. With no swap, the only memory the
cgroup can reclaim is file pages. Without the daemon, the hog evicts the working set
before the OOM killer ends the hog. With the daemon locking the target's pages, the
cgroup runs out of reclaimable memory sooner, and the hog is OOM-killed while the
working set stays resident.

Residency is measured with fincore(1) from util-linux, independently of prelock.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

import daemonproc
import procs
from prelock import cgroupfs, procfs

pytestmark = pytest.mark.root

MIB = 1 << 20
CGROUP_LIMIT_BYTES = 512 * MIB
WORKING_SET_BYTES = 128 * MIB
# The hog stops at four times the limit: reaching that means it was never OOM-killed.
HOG_MAX_MIB = 4 * CGROUP_LIMIT_BYTES // MIB
# A bound on the wait for the hog to die, so a hung test fails; it checks no timing.
HOG_EXIT_TIMEOUT_S = 120.0


@pytest.fixture
def work() -> Iterator[Path]:
    with daemonproc.work_dir() as path:
        yield path


@dataclass(frozen=True)
class Outcome:
    resident_before_bytes: int
    resident_after_bytes: int
    hog_status: int
    target_running: bool
    oom_kills: int | None


def resident_bytes(path: Path) -> int:
    """Return the bytes of path in the page cache, as fincore(1) reports them."""
    done = subprocess.run([daemonproc.require_tool("fincore"), "--bytes", "--noheadings", "--raw",
                           "--output", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def drop_from_page_cache(path: Path) -> None:
    """Evict the clean pages of path, so the cgroup process that reads them is charged."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def joiner(controller: cgroupfs.MemoryController, cgroup_path: str):
    """Return a preexec_fn that moves the child into the cgroup before it execs."""
    procs_file = controller.directory(cgroup_path) / "cgroup.procs"

    def join() -> None:
        procs_file.write_text(str(os.getpid()))

    return join


def run_pressure(work: Path, controller: cgroupfs.MemoryController, with_daemon: bool) -> Outcome:
    mapper = daemonproc.build_map_program(work, "pld-workset")
    hog = daemonproc.build_program(work, "daemon_hog.c", "pld-hog")
    working_set = daemonproc.write_file(work / "data" / "workset.bin", WORKING_SET_BYTES)
    drop_from_page_cache(working_set)
    assert resident_bytes(working_set) < WORKING_SET_BYTES // 16, "the working set is still cached"

    parent = procfs.memory_cgroup_path(procfs.read_cgroup(os.getpid()))
    name = f"{work.name}-{'daemon' if with_daemon else 'bare'}"
    with ExitStack() as stack:
        cgroup = stack.enter_context(cgroupfs.memory_cgroup(controller, parent, name, CGROUP_LIMIT_BYTES))
        join = joiner(controller, cgroup)
        target = stack.enter_context(procs.spawn([mapper, "-x", working_set], ready_line="ready",
                                                 preexec_fn=join))
        resident_before = resident_bytes(working_set)

        daemon = None
        if with_daemon:
            daemon = stack.enter_context(daemonproc.run_daemon(work, daemonproc.restricted_config(work)))
            daemon.wait_for_cycle(1)
            assert daemon.pid not in cgroupfs.list_processes(controller, cgroup)
            locked, _present = daemonproc.file_mlocked_pages(daemon.pid, daemonproc.file_key(working_set))
            assert locked == WORKING_SET_BYTES // daemonproc.PAGE_SIZE

        with procs.spawn([hog, str(HOG_MAX_MIB)], ready_line="ready", preexec_fn=join) as hogging:
            hog_status = hogging.popen.wait(timeout=HOG_EXIT_TIMEOUT_S)

        resident_after = resident_bytes(working_set)
        target_running = target.popen.poll() is None
        oom_kills = cgroupfs.read_memory(controller, cgroup).oom_kills
        if daemon is not None:
            assert daemon.stop() == 0
            assert daemon.problems() == []

    return Outcome(resident_before, resident_after, hog_status, target_running, oom_kills)


def test_pressure_with_daemon_keeps_working_set(work: Path, controller: cgroupfs.MemoryController):
    outcome = run_pressure(work, controller, with_daemon=True)

    assert outcome.resident_before_bytes == WORKING_SET_BYTES
    assert outcome.hog_status == -signal.SIGKILL, "the hog was not OOM-killed"
    assert outcome.oom_kills is None or outcome.oom_kills >= 1
    assert outcome.target_running
    assert outcome.resident_after_bytes == WORKING_SET_BYTES


def test_pressure_without_daemon_evicts_working_set(work: Path, controller: cgroupfs.MemoryController):
    outcome = run_pressure(work, controller, with_daemon=False)

    assert outcome.resident_before_bytes == WORKING_SET_BYTES
    assert outcome.hog_status == -signal.SIGKILL, "the hog was not OOM-killed"
    assert outcome.resident_after_bytes < WORKING_SET_BYTES // 2, (
        f"{outcome.resident_after_bytes} of {WORKING_SET_BYTES} bytes still resident")
