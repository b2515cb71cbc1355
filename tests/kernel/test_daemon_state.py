"""The daemon's state_dir, start-up errors and reload failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemonproc
import procs

pytestmark = pytest.mark.root

RUN = [sys.executable, "-m", "prelock.cli", "run"]


@pytest.fixture
def work() -> Iterator[Path]:
    with daemonproc.work_dir() as path:
        yield path


def run_once(config_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, "-c", str(config_path), *args], capture_output=True, text=True, timeout=120)


def test_second_daemon_same_state_dir(work: Path):
    config = daemonproc.restricted_config(work)
    with daemonproc.run_daemon(work, config) as first:
        first.wait_for_cycle(1)
        second = run_once(first.config_path, "--cycles", "1")
        assert first.stop() == 0
    assert second.returncode == 1
    assert f"another prelock daemon (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr


def test_stopped_daemon_marks_status(work: Path):
    config = daemonproc.restricted_config(work)
    with daemonproc.run_daemon(work, config) as daemon:
        daemon.wait_for_cycle(1)
        assert daemon.stop() == 0
    record = json.loads((work / "state" / "status.json").read_text())
    assert record["running"] is False
    assert record["files"] == []


def test_state_dir_is_a_file(work: Path):
    config = daemonproc.restricted_config(work)
    (work / "not-a-dir").write_text("")
    config["state_dir"] = str(work / "not-a-dir")
    done = run_once(daemonproc.write_config(work / "bad.yaml", config), "--cycles", "1")
    assert done.returncode == 1
    assert "is not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_port_in_use(work: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = daemonproc.restricted_config(work)
        config["metrics"] = {"listen": f"127.0.0.1:{busy.getsockname()[1]}"}
        done = run_once(daemonproc.write_config(work / "metrics.yaml", config), "--cycles", "1")
    assert done.returncode == 1
    assert "cannot serve metrics on 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("root", ["/nonexistent", "/sys", "relative"])
def test_bad_procfs_root(work: Path, root: str):
    config = daemonproc.write_config(work / "c.yaml", daemonproc.restricted_config(work))
    for command in (["run", "--cycles", "1"], ["plan"]):
        done = subprocess.run([sys.executable, "-m", "prelock.cli", *command, "-c", str(config),
                               "--procfs-root", root], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "is not a procfs mount" in done.stderr
        assert "Traceback" not in done.stderr


def test_procfs_root_without_memtotal(work: Path):
    fake = work / "fakeproc"
    (fake / "self").mkdir(parents=True)
    (fake / "meminfo").write_text("garbage\n")
    config = daemonproc.write_config(work / "c.yaml", daemonproc.restricted_config(work))
    done = subprocess.run([sys.executable, "-m", "prelock.cli", "plan", "-c", str(config), "--procfs-root",
                           str(fake)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "has no MemTotal line" in done.stderr
    assert "Traceback" not in done.stderr


def test_reload_of_deeply_nested_config_keeps_running(work: Path):
    program = daemonproc.build_map_program(work)
    data = daemonproc.write_file(work / "data" / "code.bin", 256 << 10)
    config = daemonproc.restricted_config(work)
    with procs.spawn([program, "-x", data], ready_line="ready"), \
            daemonproc.run_daemon(work, config) as daemon:
        daemon.wait_for_cycle(1)
        with open(daemon.config_path, "a") as f:
            f.write("others: " + "[" * 2000 + "]" * 2000 + "\n")
        daemon.reload()
        status = daemon.wait_for_more_cycles(2)
        assert daemon.is_running()
        assert str(data) in {f["path"] for f in status["files"]}
        assert any("reload failed, keeping the running config" in line for line in daemon.lines("ERROR"))
        assert daemon.stop() == 0


def test_snapshot_restore_follows_file_filters(work: Path):
    program = daemonproc.build_map_program(work)
    kept = daemonproc.write_file(work / "data" / "kept.bin", 128 << 10)
    dropped = daemonproc.write_file(work / "data" / "dropped.bin", 128 << 10)
    config = daemonproc.restricted_config(work)
    with procs.spawn([program, "-x", kept], ready_line="ready"), \
            procs.spawn([program, "-x", dropped], ready_line="ready"):
        first = run_once(daemonproc.write_config(work / "first.yaml", config), "--cycles", "1")
    assert first.returncode == 0, first.stderr

    config["files"]["exclude"] = ["dropped"]
    config["scan"]["interval"] = "1h"
    with daemonproc.run_daemon(work, config) as daemon:
        status = daemon.wait_for_cycle(1)
        assert daemon.stop() == 0
    held = {f["path"] for f in status["files"]}
    assert str(kept) in held
    assert str(dropped) not in held


def test_sigterm_during_populate_of_cold_file(work: Path):
    program = daemonproc.build_map_program(work)
    data = work / "data" / "big.bin"
    block = os.urandom(1 << 20)
    with open(data, "wb") as f:
        # Written data, so populating reads it back from disk: holes and unwritten extents
        # would map zero pages without any read.
        for _ in range(768):
            f.write(block)
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    config = daemonproc.restricted_config(work)
    config["lock"].update({"mode": "whole-file", "budget": "1GiB", "max_file_size": "1GiB"})
    with procs.spawn([program, "-n", "-x", data], ready_line="ready"), \
            daemonproc.run_daemon(work, config) as daemon:
        deadline = time.monotonic() + 60
        while "locked" not in daemon.log() and "DEBUG prelock.scan" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log_tail()
            if daemon.status() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.5)
        # stop() fails the test when the daemon takes longer than 5 s to exit.
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
