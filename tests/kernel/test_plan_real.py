"""`prelock plan` against real sshd and containerd, checked against their pagemaps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pagecheck

pytestmark = pytest.mark.root

PRELOCK = [sys.executable, "-m", "prelock.cli"]


def write_config(tmp_path: Path, mode: str = "working-set") -> Path:
    config = tmp_path / "prelock.yaml"
    config.write_text(
        "critical:\n"
        "  names: [sshd, containerd]\n"
        "others: false\n"
        f"lock:\n  mode: {mode}\n  budget: 50%\n  min_available: 1%\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    return config


def run_plan(config: Path) -> dict:
    done = subprocess.run([*PRELOCK, "plan", "--json", "-c", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def planned_pids(plan: dict) -> set[int]:
    return {p["pid"] for f in plan["files"] for p in f["processes"]}


def test_plan_lists_sshd_and_containerd_files(sshd, containerd, tmp_path):
    plan = run_plan(write_config(tmp_path))
    critical_paths = {f["path"] for f in plan["files"] if f["tier"] == "critical"}
    assert str(sshd.exe) in critical_paths
    assert str(containerd.exe) in critical_paths
    assert any("libc.so" in path for path in critical_paths)
    assert {sshd.pid, containerd.pid} <= planned_pids(plan)


def test_plan_working_set_equals_pagemap(sshd, containerd, tmp_path):
    config = write_config(tmp_path)
    pids = [sshd.pid, containerd.pid]
    # Other processes named sshd or containerd on the machine would join the plan, so the
    # independent count covers exactly the pids the plan lists.
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


def test_plan_whole_file_is_larger(sshd, containerd, tmp_path):
    working_set = run_plan(write_config(tmp_path))
    whole_file = run_plan(write_config(tmp_path, mode="whole-file"))
    assert whole_file["totals"]["planned_bytes"] > working_set["totals"]["planned_bytes"]
    for planned in whole_file["files"]:
        assert planned["pages_planned"] == planned["pages_file"]
