"""`prelock run` against the real kernel: what it locks, its budget, its limits, SIGHUP.

Each test starts its own targets from a work directory under /var/tmp and a daemon
whose config selects only those programs by executable path. PG_mlocked in
/proc/kpageflags is the ground truth for "locked".
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import daemonproc
import pagecheck
import procs

pytestmark = pytest.mark.root

MIB = 1 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    with daemonproc.work_dir() as path:
        yield path


def spawn_mappers(stack: ExitStack, program: Path, files: list[Path]) -> list[procs.SpawnedProcess]:
    """Start one `program -x FILE` per file; each touches its file's pages and waits."""
    return [stack.enter_context(procs.spawn([program, "-x", path], ready_line="ready")) for path in files]


# --- sshd and containerd -------------------------------------------------------------


@pytest.fixture
def server_copies(work: Path) -> Path:
    """Copies of the real sshd and containerd binaries in the work directory.

    Started from there, they are the only processes the test config's executable glob
    selects, even when other sshd or containerd processes run on the machine.
    """
    for exe in (procs.SSHD_EXE, procs.CONTAINERD_EXE):
        procs.require_executable(exe, "openssh-server" if exe == procs.SSHD_EXE else "containerd")
        shutil.copy2(exe, work / "bin" / exe.name)
    return work / "bin"


def test_sshd_containerd_code_locked(work: Path, server_copies: Path):
    config = daemonproc.restricted_config(work)
    # Their code is in /usr as well as in the copies: every file they map is a candidate.
    config["files"]["include"] = []
    config["lock"]["budget"] = "50%"

    with ExitStack() as stack:
        sshd = stack.enter_context(procs.run_sshd(work, exe=server_copies / "sshd"))
        # A unix socket path is limited to 107 bytes, so containerd gets a short directory.
        containerd_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pld-ctrd-")))
        containerd = stack.enter_context(procs.run_containerd(containerd_dir, exe=server_copies / "containerd"))
        pids = [sshd.pid, containerd.pid]
        own_binaries = [daemonproc.file_key(server_copies / "sshd"),
                        daemonproc.file_key(server_copies / "containerd")]

        daemon = stack.enter_context(daemonproc.run_daemon(work, config))
        status = daemon.wait_for_cycle(1)
        locked, present = pagecheck.mlocked_counts(pids)
        held_paths = {record["path"] for record in status["files"]}

        assert str(server_copies / "sshd") in held_paths
        assert str(server_copies / "containerd") in held_paths
        assert present > 0
        assert locked >= 0.95 * present, f"{locked} of {present} present code pages are mlocked"

        assert daemon.stop() == 0, daemon.log_tail()
        after_locked, _ = pagecheck.mlocked_counts(pids)
        binary_locked = [daemonproc.file_mlocked_pages(pid, key) for pid in pids for key in own_binaries]

    # Only this test's daemon locks the copied binaries. Shared libraries such as libc
    # may be locked by other processes on the machine, so they are checked through the
    # daemon's exit: its mappings, and so its locks, are gone.
    assert all(locked_pages == 0 for locked_pages, _present in binary_locked), binary_locked
    assert after_locked < locked
    assert not procs.is_running(daemon.pid)
    assert daemon.problems() == []


# --- budget ------------------------------------------------------------------------


def test_budget_locks_critical_first(work: Path):
    critical_program = daemonproc.build_map_program(work, "pld-critical")
    others_program = daemonproc.build_map_program(work, "pld-other")
    critical_files = [daemonproc.write_file(work / "data" / f"critical{i}.bin", MIB) for i in range(2)]
    others_files = [daemonproc.write_file(work / "data" / f"other{i}.bin", MIB) for i in range(4)]
    budget_bytes = 3 * MIB + 512 * 1024

    config = daemonproc.restricted_config(work)
    config["critical"]["exe"] = [str(critical_program)]
    # Every process on the machine is in the others tier now, but files.include still
    # limits locking to the work directory, which only this test's processes map.
    config["others"] = True
    config["lock"]["budget"] = f"{budget_bytes // 1024}KiB"

    with ExitStack() as stack:
        # The others start first, so a lower PID does not explain the order of locking.
        spawn_mappers(stack, others_program, others_files)
        spawn_mappers(stack, critical_program, critical_files)
        daemon = stack.enter_context(daemonproc.run_daemon(work, config))

        measured = []
        for number in (1, 2, 3):
            status = daemon.wait_for_cycle(number)
            measured.append(daemonproc.held_mlocked_bytes(daemon.pid, status))
        critical_locked = [daemonproc.file_mlocked_pages(daemon.pid, daemonproc.file_key(path))
                           for path in critical_files]
        assert daemon.stop() == 0

    held = {record["path"]: record for record in status["files"]}
    for path, (locked, _present) in zip(critical_files, critical_locked):
        assert held[str(path)]["tier"] == "critical"
        assert locked == daemonproc.file_pages(path), f"{path}: {locked} pages mlocked"

    skipped_others = [path for path in others_files if str(path) not in held]
    assert skipped_others, "the budget should leave some files of the others tier unlocked"
    assert len(skipped_others) < len(others_files), "the budget has room for one file of the others tier"
    warnings = daemon.lines("WARNING")
    for path in skipped_others:
        assert any(f"skipped {path}: over budget" in line for line in warnings), path

    for cycle, locked_bytes in enumerate(measured, start=1):
        assert locked_bytes <= budget_bytes, f"cycle {cycle}: {locked_bytes} bytes mlocked"
    assert daemon.problems() == []


# --- RLIMIT_MEMLOCK without CAP_IPC_LOCK -----------------------------------------------


def without_ipc_lock(memlock_bytes: int) -> list[str]:
    """Return the command prefix that runs the daemon without CAP_IPC_LOCK under a limit."""
    return [daemonproc.require_tool("prlimit"), f"--memlock={memlock_bytes}:{memlock_bytes}",
            daemonproc.require_tool("setpriv"), "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]


def test_tiny_memlock_limit_exits_3(work: Path):
    config_path = daemonproc.write_config(work / "daemon.yaml", daemonproc.restricted_config(work))
    done = subprocess.run([*without_ipc_lock(64 * 1024), *daemonproc.PRELOCK_RUN, "-c", str(config_path),
                           "--cycles", "1"], capture_output=True, text=True, timeout=60)

    assert done.returncode == 3, done.stderr
    assert "CAP_IPC_LOCK" in done.stderr
    assert "RLIMIT_MEMLOCK" in done.stderr
    assert "LimitMEMLOCK" in done.stderr


def test_partial_memlock_limit_locks_what_fits(work: Path):
    program = daemonproc.build_map_program(work)
    files = [daemonproc.write_file(work / "data" / f"file{i}.bin", MIB) for i in range(4)]
    limit_bytes = 2 * MIB

    with ExitStack() as stack:
        spawn_mappers(stack, program, files)
        daemon = stack.enter_context(daemonproc.run_daemon(work, daemonproc.restricted_config(work),
                                                           prefix=without_ipc_lock(limit_bytes)))
        status = daemon.wait_for_cycle(2)
        locked_bytes = daemonproc.held_mlocked_bytes(daemon.pid, status)
        assert daemon.stop() == 0

    held_paths = {record["path"] for record in status["files"]}
    assert 0 < len(held_paths & {str(path) for path in files}) < len(files)
    assert MIB <= locked_bytes <= limit_bytes
    assert any("RLIMIT_MEMLOCK" in line for line in daemon.lines("WARNING"))
    assert daemon.problems() == []


# --- SIGHUP ------------------------------------------------------------------------


def test_sighup_invalid_config_keeps_old(work: Path):
    program = daemonproc.build_map_program(work)
    first = daemonproc.write_file(work / "data" / "first.bin", MIB)
    second = daemonproc.write_file(work / "data" / "second.bin", MIB)
    config = daemonproc.restricted_config(work)
    config["files"]["include"] = [f"^{work}/data/first"]

    with ExitStack() as stack:
        spawn_mappers(stack, program, [first, second])
        daemon = stack.enter_context(daemonproc.run_daemon(work, config))
        daemon.wait_for_cycle(1)

        daemon.config_path.write_text("lock:\n  budget: 10\n")
        daemon.reload()
        after_invalid = daemon.wait_for_more_cycles(2)
        log_after_invalid = daemon.log()

        config["files"]["include"] = [f"^{work}/data/"]
        daemonproc.write_config(daemon.config_path, config)
        daemon.reload()
        after_valid = daemon.wait_for_more_cycles(1)
        second_locked, _ = daemonproc.file_mlocked_pages(daemon.pid, daemonproc.file_key(second))
        assert daemon.stop() == 0

    # The error names the file and, on the lines that follow, each invalid key.
    assert "ERROR prelock.daemon: reload failed" in log_after_invalid
    assert "lock.budget" in log_after_invalid
    assert {record["path"] for record in after_invalid["files"]} == {str(first)}
    assert {record["path"] for record in after_valid["files"]} == {str(first), str(second)}
    assert second_locked == daemonproc.file_pages(second)
