"""cgroupfs.find_memory_controller on sysfs trees built in tmp_path and on the doctor fixtures."""

from __future__ import annotations

from pathlib import Path

from prelock import cgroupfs

DOCTOR_FIXTURES = Path(__file__).parent.parent / "fixtures" / "doctor"


def cgroup_root(sysfs: Path) -> Path:
    root = sysfs / "fs" / "cgroup"
    root.mkdir(parents=True)
    return root


def test_probe_v1_memory_hierarchy(tmp_path):
    memory = cgroup_root(tmp_path) / "memory"
    memory.mkdir()
    (memory / "memory.usage_in_bytes").write_text("4096\n")

    found = cgroupfs.find_memory_controller(str(tmp_path))

    assert found == cgroupfs.MemoryController(1, memory)


def test_probe_v2_with_memory(tmp_path):
    root = cgroup_root(tmp_path)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")

    found = cgroupfs.find_memory_controller(str(tmp_path))

    assert found == cgroupfs.MemoryController(2, root)


def test_probe_hybrid_prefers_v1(tmp_path):
    # The v1 hierarchy is probed first, so it wins even when cgroup.controllers of the
    # unified mount lists memory too.
    root = cgroup_root(tmp_path)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "memory").mkdir()
    (root / "memory" / "memory.usage_in_bytes").write_text("4096\n")

    found = cgroupfs.find_memory_controller(str(tmp_path))

    assert found is not None
    assert found.version == 1
    assert found.mount == root / "memory"


def test_probe_v2_without_memory(tmp_path):
    (cgroup_root(tmp_path) / "cgroup.controllers").write_text("cpu io pids\n")

    assert cgroupfs.find_memory_controller(str(tmp_path)) is None


def test_probe_no_cgroup_mount(tmp_path):
    assert cgroupfs.find_memory_controller(str(tmp_path)) is None


def test_probe_v1_usage_directory_ignored(tmp_path):
    # Only a regular memory.usage_in_bytes marks a v1 hierarchy.
    (cgroup_root(tmp_path) / "memory" / "memory.usage_in_bytes").mkdir(parents=True)

    assert cgroupfs.find_memory_controller(str(tmp_path)) is None


def test_probe_doctor_fixtures():
    v1 = cgroupfs.find_memory_controller(str(DOCTOR_FIXTURES / "cgroup-v1" / "sys"))
    v2 = cgroupfs.find_memory_controller(str(DOCTOR_FIXTURES / "cgroup-v2" / "sys"))

    assert v1 is not None
    assert v1.version == 1
    assert v2 is not None
    assert v2.version == 2
