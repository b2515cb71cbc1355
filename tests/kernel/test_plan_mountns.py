"""A target in another mount namespace is planned through map_files, by file key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import procs

pytestmark = pytest.mark.root


@pytest.fixture
def namespaced_target(map_file_program):
    """Run a program that maps M/data inside a mount namespace where M is a bind mount.

    On the host, M holds other files with the same names, so a path lookup from the
    host finds the wrong inodes.
    """
    base = Path(tempfile.mkdtemp(prefix="prelock-mntns-", dir="/var/tmp"))
    inner, mount_point = base / "inner", base / "mnt"
    inner.mkdir()
    mount_point.mkdir()
    shutil.copy(map_file_program, inner / "nsprog")
    (inner / "data").write_bytes(os.urandom(256 << 10))
    shutil.copy(map_file_program, mount_point / "nsprog")
    (mount_point / "data").write_bytes(os.urandom(64 << 10))

    script = f"mount --bind {inner} {mount_point} && exec {mount_point}/nsprog -x {mount_point}/data"
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    try:
        with procs.spawn(argv, ready_line="ready") as process:
            yield process, inner, mount_point
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_plan_uses_namespace_file_keys(namespaced_target, tmp_path):
    process, inner, mount_point = namespaced_target
    config = tmp_path / "prelock.yaml"
    config.write_text("critical:\n  names: [nsprog]\nothers: false\nlock:\n  mode: mapped\n")

    done = subprocess.run([sys.executable, "-m", "prelock.cli", "plan", "--json", "-c", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    keys = {(f["dev"], f["inode"]): f for f in plan["files"]}

    inner_data = os.stat(inner / "data")
    host_data = os.stat(mount_point / "data")
    inner_prog = os.stat(inner / "nsprog")
    host_prog = os.stat(mount_point / "nsprog")
    assert (inner_data.st_dev, inner_data.st_ino) in keys
    assert (inner_prog.st_dev, inner_prog.st_ino) in keys
    assert (host_data.st_dev, host_data.st_ino) not in keys
    assert (host_prog.st_dev, host_prog.st_ino) not in keys

    planned = keys[(inner_data.st_dev, inner_data.st_ino)]
    assert planned["path"] == str(mount_point / "data")
    assert planned["size_bytes"] == inner_data.st_size
    assert planned["processes"][0]["pid"] == process.pid
