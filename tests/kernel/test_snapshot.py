"""The daemon restores the held set from its snapshot before any target runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pagecheck
import procs

pytestmark = pytest.mark.root

RUN = [sys.executable, "-m", "prelock.cli", "--log-level", "debug", "run"]


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="prelock-snapshot-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_config(work: Path) -> Path:
    config = work / "prelock.yaml"
    config.write_text(
        "critical:\n"
        f"  exe: ['{work}/snapprog']\n"
        "  names: []\n"
        "others: false\n"
        f"files:\n  include: ['^{work}/']\n"
        "lock:\n  linger: 1h\n"
        "scan:\n  interval: 1h\n"
        f"state_dir: {work / 'state'}\n")
    return config


def wait_for_status(work: Path, process: subprocess.Popen) -> dict:
    status_path = work / "state" / "status.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, "the daemon exited early"
        if status_path.exists():
            status = json.loads(status_path.read_text())
            # The first run left its own status file behind, and this daemon writes one
            # before its restore: wait for its first cycle.
            if status["pid"] == process.pid and status["cycles"] >= 1:
                return status
        time.sleep(0.05)
    raise AssertionError("the daemon wrote no status file within 60 s")


def mlocked_pages(daemon_pid: int, held: dict) -> int:
    entries = pagecheck.pagemap_entries(daemon_pid, held["address"], held["address"] + held["length_bytes"])
    return pagecheck.count_mlocked([entry & pagecheck.PFN_MASK for entry in entries if entry & pagecheck.PRESENT])


def first_run(work: Path, map_file_program: Path, data: Path) -> None:
    """Run the daemon for one cycle while a target maps data, so the snapshot names it."""
    config = write_config(work)
    with procs.spawn([work / "snapprog", "-x", data], ready_line="ready"):
        done = subprocess.run([*RUN, "-c", str(config), "--cycles", "1"], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    assert (work / "state" / "snapshot.json").exists()


def test_snapshot_restores_before_targets(work, map_file_program):
    shutil.copy(map_file_program, work / "snapprog")
    data = work / "data.bin"
    data.write_bytes(os.urandom(512 << 10))
    first_run(work, map_file_program, data)

    # No target runs now: only the snapshot can make the daemon lock the file.
    daemon = subprocess.Popen([*RUN, "-c", str(write_config(work))], stderr=subprocess.PIPE, text=True)
    try:
        status = wait_for_status(work, daemon)
        held = {f["inode"]: f for f in status["files"]}
        assert os.stat(data).st_ino in held
        assert mlocked_pages(daemon.pid, held[os.stat(data).st_ino]) > 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0
    assert "restored from snapshot" in stderr


def test_snapshot_skips_changed_file(work, map_file_program):
    shutil.copy(map_file_program, work / "snapprog")
    data = work / "data.bin"
    data.write_bytes(os.urandom(512 << 10))
    first_run(work, map_file_program, data)

    # Rewritten in place: same inode, new mtime, so the snapshot entry is stale.
    with open(data, "r+b") as f:
        f.write(os.urandom(4096))
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))

    done = subprocess.run([*RUN, "-c", str(write_config(work)), "--cycles", "1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads((work / "state" / "status.json").read_text())
    assert os.stat(data).st_ino not in {f["inode"] for f in status["files"]}


def test_snapshot_damaged_is_ignored(work):
    (work / "state").mkdir()
    (work / "state" / "snapshot.json").write_text("{not json")
    done = subprocess.run([*RUN, "-c", str(write_config(work)), "--cycles", "1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ignoring the snapshot" in done.stderr
