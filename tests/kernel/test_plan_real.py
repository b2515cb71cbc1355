"""`prelock plan` against real sshd and containerd, checked against their pagemaps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemonproc
import pagecheck
import procs

pytestmark = pytest.mark.root

PRELOCK = [sys.executable, "-m", "prelock.cli"]


@pytest.fixture
def servers() -> Iterator[tuple[procs.SshdProcess, procs.ContainerdProcess, Path]]:
    """Copies of the real sshd and containerd, started from a work directory.

    The test config selects them by that directory, so an sshd or containerd that
    already runs on the machine never joins the plan.
    """
    with daemonproc.work_dir() as work:
        for exe in (procs.SSHD_EXE, procs.CONTAINERD_EXE):
            procs.require_executable(exe, "openssh-server" if exe == procs.SSHD_EXE else "containerd")
            shutil.copy2(exe, work / "bin" / exe.name)
        # A unix socket path is limited to 107 bytes, so containerd gets a short directory.
        with tempfile.TemporaryDirectory(prefix="prelock-ctrd-") as containerd_dir, \
                procs.run_sshd(work, exe=work / "bin" / "sshd") as sshd, \
                procs.run_containerd(Path(containerd_dir), exe=work / "bin" / "containerd") as containerd:
            yield sshd, containerd, work


def write_config(work: Path, mode: str = "working-set") -> Path:
    config = work / f"prelock-{mode}.yaml"
    config.write_text(
        "critical:\n"
        "  names: []\n"
        f"  exe: ['{work}/bin/*']\n"
        "others: false\n"
        f"lock:\n  mode: {mode}\n  budget: 50%\n  min_available: 1%\n"
        f"state_dir: {work / 'state'}\n"
    )
    return config


def run_plan(config: Path) -> dict:
    done = subprocess.run([*PRELOCK, "plan", "--json", "-c", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def planned_pids(plan: dict) -> set[int]:
    return {p["pid"] for f in plan["files"] for p in f["processes"]}


def test_plan_lists_sshd_and_containerd_files(servers):
    sshd, containerd, work = servers
    plan = run_plan(write_config(work))
    critical_paths = {f["path"] for f in plan["files"] if f["tier"] == "critical"}
    assert str(sshd.exe) in critical_paths
    assert str(containerd.exe) in critical_paths
    assert any("libc.so" in path for path in critical_paths)
    assert {sshd.pid, containerd.pid} <= planned_pids(plan)


def test_plan_working_set_equals_pagemap(servers):
    sshd, containerd, work = servers
    config = write_config(work)
    pids = [sshd.pid, containerd.pid]
    before = pagecheck.present_code_pages(pids)
    plan = run_plan(config)
    after = pagecheck.present_code_pages(sorted(planned_pids(plan)))
    assert planned_pids(plan) == set(pids)

    planned_pages = sum(f["pages_planned"] for f in plan["files"])
    before_pages = sum(len(pages) for pages in before.values())
    after_pages = sum(len(pages) for pages in after.values())
    # Running processes only fault more pages in (there is no memory pressure here), so
    # the plan's count lies between the two independent counts taken around it.
    assert before_pages <= planned_pages <= after_pages
    assert plan["totals"]["planned_bytes"] == planned_pages * pagecheck.PAGE_SIZE


def test_plan_whole_file_is_larger(servers):
    _sshd, _containerd, work = servers
    working_set = run_plan(write_config(work))
    whole_file = run_plan(write_config(work, mode="whole-file"))
    assert whole_file["totals"]["planned_bytes"] > working_set["totals"]["planned_bytes"]
    for planned in whole_file["files"]:
        assert planned["pages_planned"] == planned["pages_file"]
