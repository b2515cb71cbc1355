"""The process fixtures start the real programs and leave nothing behind."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

import procs

pytestmark = pytest.mark.root


def test_sshd_runs_real_binary(sshd):
    assert procs.read_exe(sshd.pid) == procs.SSHD_EXE
    assert procs.is_running(sshd.pid)


def test_sshd_accepts_tcp_on_loopback(sshd):
    with socket.create_connection(("127.0.0.1", sshd.port), timeout=5) as conn:
        banner = conn.recv(64)
    assert banner.startswith(b"SSH-2.0-")


def test_sshd_listens_only_on_loopback(sshd):
    config = sshd.config_path.read_text()
    assert "ListenAddress 127.0.0.1\n" in config
    assert f"Port {sshd.port}\n" in config


def test_sshd_teardown_leaves_no_process(tmp_path: Path):
    with procs.run_sshd(tmp_path) as process:
        # A connection makes sshd fork a handler, which teardown must end too.
        with socket.create_connection(("127.0.0.1", process.port), timeout=5) as conn:
            conn.recv(64)
            handler_pids = [child.pid for child in procs.list_descendants(process.pid)]
    assert not procs.is_running(process.pid)
    for pid in handler_pids:
        assert not procs.is_running(pid), f"sshd connection handler {pid} still running"


def test_containerd_runs_real_binary(containerd):
    assert procs.read_exe(containerd.pid) == procs.CONTAINERD_EXE
    assert procs.is_running(containerd.pid)


def test_containerd_serves_private_socket(containerd):
    assert containerd.socket.is_socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(os.fspath(containerd.socket))


def test_containerd_teardown_leaves_no_process():
    with tempfile.TemporaryDirectory(prefix="prelock-ctrd-") as work_dir:
        with procs.run_containerd(Path(work_dir)) as process:
            assert procs.is_running(process.pid)
        assert not procs.is_running(process.pid)
        assert not process.socket.exists()


def test_spawn_waits_for_ready_line(map_file_program, tmp_path: Path):
    data_path = tmp_path / "data.bin"
    data_path.write_bytes(b"\x01" * (64 * 1024))

    with procs.spawn([map_file_program, "-x", data_path], ready_line="ready") as spawned:
        maps = Path(f"/proc/{spawned.pid}/maps").read_text()
        mapped_lines = [line for line in maps.splitlines() if line.endswith(str(data_path))]
        assert len(mapped_lines) == 1
        assert mapped_lines[0].split()[1] == "r-xp"
    assert not procs.is_running(spawned.pid)


def test_spawn_reports_early_exit(map_file_program, tmp_path: Path):
    missing_path = tmp_path / "missing.bin"
    with pytest.raises(procs.ProcessStartError, match="exited with status 1"):
        with procs.spawn([map_file_program, missing_path], ready_line="ready"):
            pass


def test_spawn_kills_process_ignoring_sigterm():
    argv = ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]
    with procs.spawn(argv, ready_line="ready") as spawned:
        shell_pid = spawned.pid
        sleeper_pids = [child.pid for child in procs.list_descendants(shell_pid)]
    assert not procs.is_running(shell_pid)
    for pid in sleeper_pids:
        assert not procs.is_running(pid)


def test_build_c_program_reports_compile_error():
    with pytest.raises(RuntimeError, match="gcc failed"):
        procs.build_c_program("int main(void) { return undeclared; }\n", "broken")
