"""The thrash bench on the real kernel (root): a short variant, cleanup and refusals.

The short variant uses a 256 MiB cgroup, a 96 MiB working set, a 48 MiB hog and at most
20 s per mode. It asserts the difference between no locking and locking (the hog lives
on, or the OOM killer ends it), never exact times.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import privdrop
from prelock import bench, cgroupfs
from prelock.errors import ConfigError, ExitCode

pytestmark = pytest.mark.root

MiB = 1 << 20
HAS_VMTOUCH = shutil.which("vmtouch") is not None
SHORT_OPTIONS = ["--limit", "256MiB", "--critical-size", "96MiB", "--hog-size", "48MiB",
                 "--baseline-seconds", "3"]


def short_settings(directory: Path, modes: tuple[str, ...]) -> bench.ThrashSettings:
    return bench.ThrashSettings(limit_bytes=256 * MiB, critical_bytes=96 * MiB, hog_bytes=48 * MiB,
                                modes=modes, max_seconds=20.0, baseline_seconds=3.0, directory=str(directory))


def bench_cgroups(controller: cgroupfs.MemoryController, pid: int) -> list[str]:
    directory = controller.directory(bench.parent_cgroup(controller))
    return sorted(name for name in os.listdir(directory) if name.startswith(f"{bench.CGROUP_PREFIX}{pid}-"))


@pytest.fixture(scope="module")
def short_run(controller, tmp_path_factory) -> tuple[bench.ThrashReport, Path]:
    directory = tmp_path_factory.mktemp("bench")
    modes = ("none", "all", "vmtouch") if HAS_VMTOUCH else ("none", "all")
    report = bench.run_thrash(short_settings(directory, modes))
    return report, directory


def mode_result(report: bench.ThrashReport, mode: str) -> bench.ModeResult:
    (result,) = [result for result in report.modes if result.mode == mode]
    return result


def test_short_none_leaves_hog_alive(short_run):
    report, _ = short_run
    none = mode_result(report, "none")
    assert none.hog_exit == "alive", none
    assert none.oom_kills == 0
    assert none.critical_alive
    assert none.warnings == []


def test_short_all_gets_hog_oom_killed(short_run):
    report, _ = short_run
    locked = mode_result(report, "all")
    assert locked.hog_killed, locked
    assert locked.hog_end_s < 20.0
    assert locked.critical_alive
    assert locked.locked_bytes >= 96 * MiB


def test_short_locking_keeps_heartbeat_faster(short_run):
    report, _ = short_run
    none = mode_result(report, "none")
    locked = mode_result(report, "all")
    assert report.baseline is not None and report.baseline.count > 0
    assert locked.heartbeat.p99_s < none.heartbeat.p99_s
    assert locked.critical_major_faults < none.critical_major_faults


@pytest.mark.skipif(not HAS_VMTOUCH, reason="vmtouch is not installed")
def test_short_vmtouch_gets_hog_oom_killed(short_run):
    report, _ = short_run
    vmtouch = mode_result(report, "vmtouch")
    assert vmtouch.hog_killed, vmtouch
    assert vmtouch.locked_bytes >= (96 + 48) * MiB


def test_short_run_leaves_nothing_behind(short_run, controller):
    _, directory = short_run
    assert bench_cgroups(controller, os.getpid()) == []
    assert list(directory.iterdir()) == []
    assert psutil.Process().children(recursive=True) == []


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prelock", "bench", "thrash", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_hog(controller: cgroupfs.MemoryController, cli: subprocess.Popen, mode: str) -> list[psutil.Process]:
    """Wait until the mode's cgroup contains the critical process and the hog."""
    path = f"{bench.parent_cgroup(controller).rstrip('/')}/{bench.CGROUP_PREFIX}{cli.pid}-{mode}"
    deadline = time.monotonic() + 60
    while len(cgroupfs.list_processes(controller, path)) < 2:
        assert cli.poll() is None, cli.communicate()
        assert time.monotonic() < deadline, "the hog did not start within 60 s"
        time.sleep(0.1)
    return psutil.Process(cli.pid).children(recursive=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_cleans_up(controller, tmp_path, signum):
    cli = run_cli([*SHORT_OPTIONS, "--modes", "none", "--max-seconds", "60", "--dir", str(tmp_path)])
    try:
        children = wait_for_hog(controller, cli, "none")
        cli.send_signal(signum)
        _, stderr = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()

    assert cli.returncode == 130, stderr
    assert "interrupted" in stderr
    assert bench_cgroups(controller, cli.pid) == []
    assert list(tmp_path.iterdir()) == []
    assert len(children) >= 2
    for child in children:
        assert not child.is_running(), f"pid {child.pid} ({child.name()}) outlived the bench"


def test_cli_json_output(tmp_path):
    cli = run_cli([*SHORT_OPTIONS, "--modes", "vmtouch" if HAS_VMTOUCH else "none", "--max-seconds", "3",
                   "--baseline-seconds", "1", "--json", "--dir", str(tmp_path)])
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr
    data = json.loads(stdout)
    assert data["baseline"]["count"] > 0
    assert len(data["modes"]) == 1
    assert data["modes"][0]["samples"]
    assert data["machine"]["cgroup_version"] in (1, 2)


def test_cli_limit_alone_scales_default_sizes(tmp_path):
    cli = run_cli(["--limit", "256MiB", "--modes", "none", "--max-seconds", "3", "--baseline-seconds", "1",
                   "--json", "--dir", str(tmp_path)])
    stdout, stderr = cli.communicate(timeout=120)
    assert cli.returncode == 0, stderr
    settings = json.loads(stdout)["settings"]
    assert settings["critical_bytes"] == 96 * MiB
    assert settings["hog_bytes"] == 48 * MiB


def test_cli_rejects_non_root():
    # The interpreter may live where the user nobody cannot read it (under /root, say), so the
    # child imports everything first and then drops its effective uid.
    code = ("import os, sys\n"
            "from prelock.cli import main\n"
            "import prelock.cli.bench\n"
            f"os.setegid({privdrop.NOBODY_ID}); os.seteuid({privdrop.NOBODY_ID})\n"
            "main(['bench', 'thrash'])\n")
    cli = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert cli.returncode == ExitCode.MISSING_PRIVILEGE, cli.stderr
    assert "must run as root" in cli.stderr


def test_directory_on_tmpfs_rejected():
    if not os.path.ismount("/dev/shm"):
        pytest.skip("/dev/shm is not mounted")
    with pytest.raises(ConfigError, match="tmpfs"):
        bench.check_directory("/dev/shm", MiB)
