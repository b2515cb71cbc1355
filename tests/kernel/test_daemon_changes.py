"""`prelock run` while its targets and their files change under it.

Each case must leave the daemon running, the right pages PG_mlocked in the daemon's
own mappings (read from /proc/kpageflags), and no old inode mapped by the daemon once
no target maps it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

import daemonproc
import procs

pytestmark = pytest.mark.root

MIB = 1 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    with daemonproc.work_dir() as path:
        yield path


def assert_fully_locked(daemon: daemonproc.DaemonProcess, path: Path) -> None:
    """Assert that every page of the file at path is PG_mlocked in the daemon's mappings."""
    locked, _present = daemonproc.file_mlocked_pages(daemon.pid, daemonproc.file_key(path))
    expected = daemonproc.file_pages(path)
    assert locked == expected, f"{path}: {locked} of {expected} pages mlocked; log:\n{daemon.log_tail()}"


# --- upgrade by rename ---------------------------------------------------------------


def test_upgrade_by_rename(work: Path):
    program = daemonproc.build_map_program(work)
    path = daemonproc.write_file(work / "data" / "code.bin", 2 * MIB)
    old_key = daemonproc.file_key(path)
    config = daemonproc.restricted_config(work)
    # With a linger of 10 minutes, only the unlinked old inode explains a prompt release.
    config["lock"]["linger"] = "10m"

    with ExitStack() as stack:
        old_target = stack.enter_context(procs.spawn([program, "-x", path], ready_line="ready"))
        daemon = stack.enter_context(daemonproc.run_daemon(work, config))
        daemon.wait_for_cycle(1)
        old_locked_before, _ = daemonproc.file_mlocked_pages(daemon.pid, old_key)

        staged = daemonproc.write_file(work / "data" / "code.bin.new", 3 * MIB)
        os.rename(staged, path)
        new_key = daemonproc.file_key(path)
        daemon.wait_for_more_cycles(1)
        old_locked_after_rename, _ = daemonproc.file_mlocked_pages(daemon.pid, old_key)

        with procs.spawn([program, "-x", path], ready_line="ready"):
            daemon.wait_for_more_cycles(1)
            new_locked, _ = daemonproc.file_mlocked_pages(daemon.pid, new_key)
            old_locked_both, _ = daemonproc.file_mlocked_pages(daemon.pid, old_key)

            procs.end_process(old_target.popen)
            daemon.wait_for_more_cycles(1)
            old_still_mapped = daemonproc.maps_file(daemon.pid, old_key)
            new_locked_after_exit, _ = daemonproc.file_mlocked_pages(daemon.pid, new_key)

        assert daemon.stop() == 0

    old_pages = 2 * MIB // daemonproc.PAGE_SIZE
    new_pages = 3 * MIB // daemonproc.PAGE_SIZE
    assert old_locked_before == old_pages
    assert old_locked_after_rename == old_pages, "the old inode must stay locked while a target maps it"
    assert new_locked == new_pages
    assert old_locked_both == old_pages
    assert not old_still_mapped, "the daemon still maps the old inode after its last target exited"
    assert new_locked_after_exit == new_pages
    assert daemon.problems() == []


# --- truncate while locked ---------------------------------------------------------


@pytest.mark.parametrize("rewrite_bytes", [4 * MIB, 6 * MIB], ids=["same-size", "larger"])
def test_truncate_then_rewrite(work: Path, rewrite_bytes: int):
    program = daemonproc.build_map_program(work)
    path = daemonproc.write_file(work / "data" / "code.bin", 4 * MIB)
    key = daemonproc.file_key(path)

    with ExitStack() as stack:
        stack.enter_context(procs.spawn([program, "-x", path], ready_line="ready"))
        daemon = stack.enter_context(daemonproc.run_daemon(work, daemonproc.restricted_config(work)))
        daemon.wait_for_cycle(1)
        locked_before, _ = daemonproc.file_mlocked_pages(daemon.pid, key)

        # Truncating drops the locked pages from every mapping. A read of the daemon's
        # mapping beyond the new end of file would raise SIGBUS in the daemon.
        os.truncate(path, 0)
        daemon.wait_for_more_cycles(2)
        locked_truncated, _ = daemonproc.file_mlocked_pages(daemon.pid, key)

        # The rewrite in place keeps the inode. A new target maps the new content,
        # because the first target's page tables lost the truncated pages.
        with open(path, "r+b") as f:
            f.write(os.urandom(rewrite_bytes))
        stack.enter_context(procs.spawn([program, "-x", path], ready_line="ready"))
        daemon.wait_for_more_cycles(1)
        assert_fully_locked(daemon, path)
        assert daemon.stop() == 0

    assert daemonproc.file_key(path) == key
    assert locked_before == 4 * MIB // daemonproc.PAGE_SIZE
    assert locked_truncated == 0
    assert daemon.problems() == []


# --- targets that exit mid-cycle -----------------------------------------------------


def test_short_lived_targets(work: Path):
    mapper = daemonproc.build_map_program(work)
    churn = daemonproc.build_program(work, "daemon_churn.c", "pld-churn")
    stable = daemonproc.write_file(work / "data" / "stable.bin", MIB)
    churn_files = [daemonproc.write_file(work / "data" / f"churn{i}.bin", 512 * 1024) for i in range(4)]
    config = daemonproc.restricted_config(work)
    config["lock"]["linger"] = "0s"

    with ExitStack() as stack:
        stack.enter_context(procs.spawn([mapper, "-x", stable], ready_line="ready"))
        daemon = stack.enter_context(daemonproc.run_daemon(work, config))
        daemon.wait_for_cycle(1)

        # Children live up to 30 ms each, 32 at a time, for 6 cycles of the daemon.
        with procs.spawn([churn, "6000", "32", "30", *churn_files], ready_line="ready") as churning:
            assert churning.popen.wait(timeout=60) == 0
            children = int(churning.popen.stdout.read().decode().split()[-1])

        daemon.wait_for_more_cycles(2)
        assert daemon.is_running()
        assert_fully_locked(daemon, stable)
        pinned = [path for path in churn_files if daemonproc.maps_file(daemon.pid, daemonproc.file_key(path))]
        assert daemon.stop() == 0

    assert children > 100, f"only {children} short-lived targets ran"
    assert pinned == [], "files of exited targets are still mapped by the daemon"
    assert daemon.problems() == []


# --- a zombie target -----------------------------------------------------------------


def test_zombie_target(work: Path):
    program = daemonproc.build_program(work, "daemon_zombie.c", "pld-zombie")
    parent_file = daemonproc.write_file(work / "data" / "parent.bin", MIB)
    child_file = daemonproc.write_file(work / "data" / "child.bin", MIB)
    config = daemonproc.restricted_config(work)
    config["lock"]["linger"] = "0s"

    with ExitStack() as stack:
        parent = stack.enter_context(procs.spawn([program, parent_file, child_file], ready_line="ready"))
        zombie_pid = psutil.Process(parent.pid).children()[0].pid
        daemon = stack.enter_context(daemonproc.run_daemon(work, config))
        daemon.wait_for_cycle(3)

        assert psutil.Process(zombie_pid).status() == psutil.STATUS_ZOMBIE
        assert daemon.is_running()
        assert_fully_locked(daemon, parent_file)
        assert not daemonproc.maps_file(daemon.pid, daemonproc.file_key(child_file))
        assert daemon.stop() == 0

    assert daemon.problems() == []


# --- a target whose main thread exited -----------------------------------------------


def test_main_thread_exited(work: Path):
    program = daemonproc.build_program(work, "daemon_thread_exit.c", "pld-thread-exit", ["-pthread"])
    path = daemonproc.write_file(work / "data" / "code.bin", MIB)

    with ExitStack() as stack:
        target = stack.enter_context(procs.spawn([program, path], ready_line="ready"))
        thread_ids = [int(name) for name in os.listdir(f"/proc/{target.pid}/task") if int(name) != target.pid]
        assert Path(f"/proc/{target.pid}/maps").read_bytes() == b""
        assert str(path) in Path(f"/proc/{target.pid}/task/{thread_ids[0]}/maps").read_text()

        daemon = stack.enter_context(daemonproc.run_daemon(work, daemonproc.restricted_config(work)))
        status = daemon.wait_for_cycle(2)
        assert daemon.is_running()
        assert str(path) in {record["path"] for record in status["files"]}, daemon.log_tail()
        assert_fully_locked(daemon, path)
        assert daemon.stop() == 0

    assert daemon.problems() == []


# --- a FIFO where a mapped file was ---------------------------------------------------


def without_map_files() -> list[str]:
    """Return the prefix that runs the daemon as root without map_files access.

    Opening /proc/PID/map_files needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, so the
    daemon falls back to /proc/PID/root/PATH.
    """
    return [daemonproc.require_tool("setpriv"), "--bounding-set=-sys_admin,-checkpoint_restore",
            "--inh-caps=-sys_admin,-checkpoint_restore"]


def replace_with_fifo(path: Path) -> None:
    os.unlink(path)
    os.mkfifo(path)


def test_fifo_before_first_lock(work: Path):
    program = daemonproc.build_map_program(work)
    kept = daemonproc.write_file(work / "data" / "kept.bin", MIB)
    replaced = daemonproc.write_file(work / "data" / "replaced.bin", MIB)
    replaced_key = daemonproc.file_key(replaced)

    with ExitStack() as stack:
        stack.enter_context(procs.spawn([program, "-x", kept], ready_line="ready"))
        stack.enter_context(procs.spawn([program, "-x", replaced], ready_line="ready"))
        replace_with_fifo(replaced)

        # Opening a FIFO without O_NONBLOCK blocks until a writer appears, which would
        # stop the daemon in its first cycle.
        daemon = stack.enter_context(daemonproc.run_daemon(work, daemonproc.restricted_config(work),
                                                           prefix=without_map_files()))
        daemon.wait_for_cycle(3)
        assert_fully_locked(daemon, kept)
        assert not daemonproc.maps_file(daemon.pid, replaced_key)
        assert daemon.stop() == 0

    assert any(f"skipped {replaced}" in line for line in daemon.lines("WARNING")), daemon.log_tail()
    assert daemon.problems() == []


def test_fifo_after_lock_releases_old_inode(work: Path):
    program = daemonproc.build_map_program(work)
    kept = daemonproc.write_file(work / "data" / "kept.bin", MIB)
    replaced = daemonproc.write_file(work / "data" / "replaced.bin", MIB)
    replaced_key = daemonproc.file_key(replaced)
    config = daemonproc.restricted_config(work)
    # With a linger of 10 minutes, only the unlinked old inode explains a prompt release.
    config["lock"]["linger"] = "10m"

    with ExitStack() as stack:
        stack.enter_context(procs.spawn([program, "-x", kept], ready_line="ready"))
        replaced_target = stack.enter_context(procs.spawn([program, "-x", replaced], ready_line="ready"))
        daemon = stack.enter_context(daemonproc.run_daemon(work, config, prefix=without_map_files()))
        daemon.wait_for_cycle(1)
        locked_before, _ = daemonproc.file_mlocked_pages(daemon.pid, replaced_key)

        replace_with_fifo(replaced)
        daemon.wait_for_more_cycles(1)
        assert daemon.is_running()

        procs.end_process(replaced_target.popen)
        daemon.wait_for_more_cycles(2)
        old_still_mapped = daemonproc.maps_file(daemon.pid, replaced_key)
        assert_fully_locked(daemon, kept)
        assert daemon.stop() == 0

    assert locked_before == MIB // daemonproc.PAGE_SIZE
    assert not old_still_mapped, "the daemon still maps the replaced inode after its last target exited"
    assert daemon.problems() == []
