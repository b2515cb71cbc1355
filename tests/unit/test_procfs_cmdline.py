"""/proc/PID/cmdline: the parser on literal bytes, the reader on a fixture tree and on processes the tests start."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from prelock import procfs
from prelock.errors import ProcessGone

CMDLINE_CASES = [
    pytest.param(b"kubelet\0--config\0/var/lib/kubelet/config.yaml\0",
                 ["kubelet", "--config", "/var/lib/kubelet/config.yaml"], id="nul-terminated"),
    pytest.param(b"", [], id="empty-kernel-thread-or-zombie"),
    pytest.param(b"sleep\x00\x0060\x00", ["sleep", "60"], id="empty-argument-dropped"),
    pytest.param(b"sleep\x0060", ["sleep", "60"], id="no-trailing-nul"),
    pytest.param(b"nginx: worker process", ["nginx: worker process"], id="rewritten-argv"),
    pytest.param(b"/opt/my app/run\0--name=a b\0", ["/opt/my app/run", "--name=a b"], id="spaces"),
    pytest.param(b"prog\0line1\nline2\0", ["prog", "line1\nline2"], id="newline"),
]


@pytest.mark.parametrize(("data", "expected"), CMDLINE_CASES)
def test_parse_cmdline(data: bytes, expected: list[str]):
    assert procfs.parse_cmdline(data) == expected


def test_parse_cmdline_non_utf8_round_trip():
    raw = b"/opt/caf\xe9/bin/run\xff"

    (arg,) = procfs.parse_cmdline(raw + b"\0")

    assert os.fsencode(arg) == raw


def test_read_cmdline_fixture_tree(tmp_path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cmdline").write_bytes(b"/usr/bin/kubelet\0--v=2\0")

    assert procfs.read_cmdline(4242, str(tmp_path)) == ["/usr/bin/kubelet", "--v=2"]


def test_read_cmdline_missing_pid_is_process_gone(tmp_path):
    with pytest.raises(ProcessGone) as excinfo:
        procfs.read_cmdline(4242, str(tmp_path))

    assert excinfo.value.pid == 4242


@pytest.fixture
def child():
    """Start one sleep(1) with arguments that need care, and end it by its PID afterwards."""
    argv = [shutil.which("sleep"), "60", "--", "an argument with spaces"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    yield process, argv
    process.kill()
    process.wait()


def test_read_cmdline_live_process(child):
    process, argv = child

    # Popen returns once exec has succeeded, so cmdline already shows the new argv.
    assert procfs.read_cmdline(process.pid) == argv


def test_read_cmdline_zombie_is_empty(child):
    process, _ = child
    process.kill()
    wait_for_zombie(process.pid)

    # A zombie has no memory map left to read its arguments from.
    assert procfs.read_cmdline(process.pid) == []


def wait_for_zombie(pid: int) -> None:
    for _ in range(1000):
        if procfs.read_stat(pid).state == "Z":
            return
        time.sleep(0.001)
    pytest.fail(f"process {pid} did not become a zombie after SIGKILL")
