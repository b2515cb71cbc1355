"""What the daemon offers around it: sd_notify, Prometheus metrics and `prelock status`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemonproc
import procs

pytestmark = pytest.mark.root


@pytest.fixture
def work() -> Iterator[Path]:
    with daemonproc.work_dir() as path:
        yield path


@pytest.fixture
def target(work: Path) -> Iterator[Path]:
    """One target program in work/bin mapping a 1 MiB file of work/data."""
    program = daemonproc.build_map_program(work)
    data = daemonproc.write_file(work / "data" / "code.bin", 1 << 20)
    with procs.spawn([program, "-x", data], ready_line="ready"):
        yield data


def test_sd_notify_ready_and_stopping(work: Path, target: Path):
    notify_path = work / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        prefix = ["env", f"NOTIFY_SOCKET={notify_path}"]
        with daemonproc.run_daemon(work, daemonproc.restricted_config(work), prefix=prefix) as daemon:
            first = notify.recv(4096).decode()
            assert first == "READY=1"
            # READY=1 comes after the first cycle, so the file is already locked.
            status = daemon.status()
            assert status is not None
            assert str(target) in {f["path"] for f in status["files"]}
            assert daemon.stop() == 0

        messages = []
        notify.settimeout(1)
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except TimeoutError:
            pass
    assert "STOPPING=1" in messages
    assert any(m.startswith("STATUS=holding ") for m in messages)


def test_metrics_report_locked_bytes(work: Path, target: Path):
    port = procs.pick_free_port()
    config = daemonproc.restricted_config(work)
    config["metrics"] = {"listen": f"127.0.0.1:{port}"}
    with daemonproc.run_daemon(work, config) as daemon:
        status = daemon.wait_for_cycle(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert daemon.stop() == 0

    values = {}
    for line in text.splitlines():
        if line.startswith("prelock_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['prelock_locked_bytes{tier="critical"}'] == status["locked_bytes_by_tier"]["critical"]
    assert values['prelock_held_files{tier="critical"}'] == len(status["files"])
    assert values["prelock_budget_bytes"] == 256 << 20
    assert values["prelock_cycles_total"] >= 1


def test_status_verifies_against_kpageflags(work: Path, target: Path):
    with daemonproc.run_daemon(work, daemonproc.restricted_config(work)) as daemon:
        daemon.wait_for_cycle(1)
        done = subprocess.run([sys.executable, "-m", "prelock.cli", "status", "--json", "-c",
                               str(daemon.config_path)], capture_output=True, text=True, timeout=60)
        assert daemon.stop() == 0
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["running"] is True
    held = {f["path"]: f for f in record["files"]}
    assert str(target) in held
    # Pages written with write() sit in large folios, which the kernel may hold without
    # PG_mlocked, so status reports at most what the daemon counted, and more than nothing.
    assert 0 < held[str(target)]["mlocked_bytes"] <= held[str(target)]["locked_bytes"]


def test_status_without_daemon(work: Path):
    config = daemonproc.write_config(work / "prelock.yaml", daemonproc.restricted_config(work))
    done = subprocess.run([sys.executable, "-m", "prelock.cli", "status", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no status file" in done.stderr
    assert "Traceback" not in done.stderr
