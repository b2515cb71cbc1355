"""`prelock doctor`: analysis on fixture trees, the CLI output, and the live system.

Fixture trees live under tests/fixtures/doctor/. gpu-node-livelock holds /proc/meminfo
and /proc/slabinfo of a GPU node at the moment it livelocked (62 GiB RAM, no swap,
Linux 5.10, x86_64 with 4 KiB pages).

The tests at the end run against the live /proc and against processes that the tests
start themselves (a copy of sleep named kubelet, a fake `prelock run`). They need no
root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from prelock import doctor, native, sysmem
from prelock.cli import main
from prelock.cli.doctor import protection_record
from prelock.doctor_snapshot import read_source

FIXTURES = Path(__file__).parent.parent / "fixtures" / "doctor"
GPU_NODE = FIXTURES / "gpu-node-livelock"
SWAP_NODE = FIXTURES / "swap-node"
KUBELET_NODE = FIXTURES / "kubelet-node"
DOCS = Path(__file__).parent.parent.parent / "docs" / "doctor.md"
GIB = 1 << 30

ALL_RECOMMENDATIONS = {"run_prelock", "mglru_min_ttl", "kubelet_reserved", "node_eviction_rate", "early_oom",
                       "driver_memory"}


@pytest.fixture
def empty_sysfs(tmp_path: Path) -> str:
    sysfs = tmp_path / "sys"
    sysfs.mkdir()
    return str(sysfs)


def collect_fixture(procfs: Path, sysfs: str | Path) -> doctor.Report:
    return doctor.collect(str(procfs), str(sysfs), interval_s=0, state_dirs=None)


def assert_adds_up(breakdown: doctor.Breakdown) -> None:
    accounted = sum(category.size_bytes for category in breakdown.categories)
    assert accounted + breakdown.unaccounted_bytes == breakdown.total_bytes
    assert all(category.size_bytes >= 0 for category in breakdown.categories)


def run_cli(*args: str):
    return CliRunner().invoke(main, ["doctor", *args])


def recommendation(report: doctor.Report, key: str) -> doctor.Recommendation:
    matches = [item for item in report.recommendations if item.key == key]
    assert matches, f"no {key} recommendation in {[item.key for item in report.recommendations]}"
    return matches[0]


# The GPU node that livelocked


def test_gpu_livelock_unaccounted_memory(empty_sysfs):
    report = collect_fixture(GPU_NODE, empty_sysfs)

    breakdown = report.breakdown
    assert breakdown is not None
    assert breakdown.unaccounted_bytes / GIB == pytest.approx(33.8, abs=0.05)
    assert breakdown.unaccounted_bytes / breakdown.total_bytes * 100 == pytest.approx(55.7, abs=0.05)
    assert_adds_up(breakdown)


def test_gpu_livelock_counts_shmem_once(empty_sysfs):
    breakdown = collect_fixture(GPU_NODE, empty_sysfs).breakdown
    sizes = {category.key: category.size_bytes for category in breakdown.categories}

    assert sizes["page_cache_file"] == (26580 - 5188) * 1024
    assert sizes["shmem"] == 5188 * 1024
    assert sizes["anon"] == 27100712 * 1024
    assert "anon_thp" not in sizes


def test_gpu_livelock_names_nvidia_slab_as_holder():
    meminfo = sysmem.read_meminfo(str(GPU_NODE))
    slabs = sysmem.read_slabinfo(str(GPU_NODE))

    holders = doctor.find_holders(None, slabs, meminfo, page_size=4096)

    assert [holder.name for holder in holders] == ["nvidia_pte_cache-2782818403"]
    holder = holders[0]
    assert holder.kind == "slab"
    assert holder.estimate_bytes == 8650926 * 4096
    assert holder.estimate_bytes / GIB == pytest.approx(33.0, abs=0.05)
    assert "8,650,926 active objects x 4096-byte page" in holder.method


def test_gpu_livelock_verdict_is_thrashing_risk(empty_sysfs):
    verdict = collect_fixture(GPU_NODE, empty_sysfs).verdict

    assert verdict.state == doctor.THRASHING_RISK
    fired = {rule.key for rule in verdict.rules if rule.fired}
    assert "unaccounted_high" in fired
    assert "file_cache_small" in fired
    assert "available_low" in fired


def test_gpu_livelock_states_the_rules(empty_sysfs):
    rules = {rule.key: rule for rule in collect_fixture(GPU_NODE, empty_sysfs).verdict.rules}

    assert rules["unaccounted_high"].condition == (
        "unaccounted memory > 25% of MemTotal and MemAvailable < 10% of MemTotal")
    assert rules["unaccounted_high"].observed == "unaccounted 55.7 %, MemAvailable 0.03 %"
    assert rules["file_cache_small"].condition == "file LRU < 2 x Mapped and MemAvailable < 10% of MemTotal"


def test_gpu_livelock_recommendations(empty_sysfs):
    report = collect_fixture(GPU_NODE, empty_sysfs)

    assert {item.key for item in report.recommendations} == ALL_RECOMMENDATIONS
    assert recommendation(report, "run_prelock").commands == ("systemctl enable --now prelock.service",)
    assert "sudo ./scripts/install-and-run.sh --systemd" in recommendation(report, "run_prelock").note
    assert "copy systemd/prelock.service from the source to /etc/systemd/system/" in (
        recommendation(report, "run_prelock").note)
    assert "echo 1000 > /sys/kernel/mm/lru_gen/min_ttl_ms" in recommendation(report, "mglru_min_ttl").commands
    kubelet = " ".join(recommendation(report, "kubelet_reserved").commands)
    assert "--system-reserved=memory=4Gi" in kubelet
    assert "--eviction-hard='memory.available<5%," in kubelet
    assert recommendation(report, "node_eviction_rate").commands == (
        "kube-controller-manager --node-eviction-rate=0.01",)
    assert any(command.startswith("earlyoom -m 5") for command in recommendation(report, "early_oom").commands)
    driver = recommendation(report, "driver_memory")
    assert "fuser -v /dev/nvidia*" in driver.commands
    assert "33.8 GiB (55.7 % of MemTotal)" in driver.reason
    assert "nvidia_pte_cache-2782818403 tracks about" in driver.reason


def test_gpu_livelock_json_output(empty_sysfs):
    result = run_cli("--json", "--interval", "0", "--procfs-root", str(GPU_NODE), "--sysfs-root", empty_sysfs)

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    unaccounted = record["breakdown"]["unaccounted"]
    assert unaccounted["label"] == "unaccounted (kernel or driver allocations)"
    assert unaccounted["gib"] == pytest.approx(33.77, abs=0.01)
    assert unaccounted["percent_of_total"] == pytest.approx(55.68, abs=0.01)
    assert record["holders"][0]["name"] == "nvidia_pte_cache-2782818403"
    assert record["verdict"]["state"] == "thrashing risk"
    assert {item["key"] for item in record["recommendations"]} == ALL_RECOMMENDATIONS
    assert record["rates"] is None


def test_gpu_livelock_text_output(empty_sysfs):
    result = run_cli("--interval", "0", "--procfs-root", str(GPU_NODE), "--sysfs-root", empty_sysfs)

    assert result.exit_code == 0, result.output
    assert result.output.startswith("prelock doctor: thrashing risk")
    assert re.search(r"^unaccounted \(kernel or driver allocations\) +33\.77 +55\.7 ", result.output, re.MULTILINE)
    assert "nvidia_pte_cache-2782818403 (slab" in result.output
    assert "kube-controller-manager --node-eviction-rate=0.01" in result.output


def test_text_output_fits_100_columns(empty_sysfs):
    result = run_cli("--interval", "0", "--procfs-root", str(GPU_NODE), "--sysfs-root", empty_sysfs)

    # Recommendation commands (indented by five spaces) stay unwrapped so they can be copied.
    wide = [line for line in result.output.splitlines() if len(line) >= 100 and not line.startswith("     ")]
    assert wide == []


# Swap, MGLRU, accelerator modules, rates


def test_swap_node_breakdown_adds_up():
    report = collect_fixture(SWAP_NODE / "proc", SWAP_NODE / "sys")

    breakdown = report.breakdown
    assert_adds_up(breakdown)
    assert breakdown.unaccounted_bytes == 980364 * 1024
    sizes = {category.key: category.size_bytes for category in breakdown.categories}
    assert sizes["swap_cache"] == 262144 * 1024
    assert sizes["kernel_reclaimable_other"] == (327680 - 262144) * 1024
    assert sizes["vmalloc"] == (90112 - 24576) * 1024


def test_swap_node_reads_swap_areas():
    report = collect_fixture(SWAP_NODE / "proc", SWAP_NODE / "sys")

    assert [area.path for area in report.snapshot.swaps] == ["/dev/nvme0n1p3", "/var/lib/swap file"]


def test_swap_node_json_swap_fields(empty_sysfs):
    result = run_cli("--json", "--interval", "0", "--procfs-root", str(SWAP_NODE / "proc"),
                     "--sysfs-root", empty_sysfs)

    swap = json.loads(result.stdout)["swap"]
    assert swap["total"]["bytes"] == 8388604 * 1024
    assert swap["free"]["bytes"] == 5242876 * 1024
    assert swap["areas"][1]["type"] == "file"


def test_swap_node_under_pressure():
    verdict = collect_fixture(SWAP_NODE / "proc", SWAP_NODE / "sys").verdict

    assert verdict.state == doctor.UNDER_PRESSURE
    fired = {rule.key for rule in verdict.rules if rule.fired}
    assert fired == {"available_low", "psi_memory_some"}
    assert verdict.note is None


def test_swap_node_lists_amdgpu_without_estimate():
    report = collect_fixture(SWAP_NODE / "proc", SWAP_NODE / "sys")

    assert [holder.name for holder in report.holders] == ["amdgpu"]
    assert report.holders[0].estimate_bytes is None
    assert "fuser -v /dev/dri/* /dev/kfd" in recommendation(report, "driver_memory").commands


def test_mglru_on_with_zero_ttl_recommends_ttl():
    report = collect_fixture(SWAP_NODE / "proc", FIXTURES / "mglru-node" / "sys")

    assert report.snapshot.lru_gen == sysmem.LruGen(enabled_mask=0x7, min_ttl_ms=0)
    item = recommendation(report, "mglru_min_ttl")
    assert item.commands == ("echo 1000 > /sys/kernel/mm/lru_gen/min_ttl_ms",)
    assert "tmpfiles.d" in item.note


def test_mglru_off_recommends_enabling(tmp_path):
    lru_gen = tmp_path / "kernel" / "mm" / "lru_gen"
    lru_gen.mkdir(parents=True)
    (lru_gen / "enabled").write_text("0x0000\n")
    (lru_gen / "min_ttl_ms").write_text("0\n")

    item = recommendation(collect_fixture(SWAP_NODE / "proc", tmp_path), "mglru_min_ttl")

    assert item.commands[0] == "echo y > /sys/kernel/mm/lru_gen/enabled"


def test_mglru_with_ttl_set_needs_nothing(tmp_path):
    lru_gen = tmp_path / "kernel" / "mm" / "lru_gen"
    lru_gen.mkdir(parents=True)
    (lru_gen / "enabled").write_text("0x0007\n")
    (lru_gen / "min_ttl_ms").write_text("1000\n")

    report = collect_fixture(SWAP_NODE / "proc", tmp_path)

    assert "mglru_min_ttl" not in {item.key for item in report.recommendations}


def snapshot_from_text(vmstat: str, memory_psi: str, io_psi: str, read_at_s: float) -> doctor.Snapshot:
    snap = doctor.Snapshot(vmstat=sysmem.parse_vmstat(vmstat), counters_read_at_s=read_at_s)
    snap.pressure = {"memory": sysmem.parse_pressure(memory_psi), "io": sysmem.parse_pressure(io_psi)}
    return snap


def test_rates_from_two_snapshots():
    before = snapshot_from_text(
        "workingset_refault_file 1000\npgmajfault 50\npgscan_kswapd 10\npgscan_direct 0\npgsteal_kswapd 5\n",
        "some avg10=0 avg60=0 avg300=0 total=0\nfull avg10=0 avg60=0 avg300=0 total=0\n",
        "some avg10=0 avg60=0 avg300=0 total=0\nfull avg10=0 avg60=0 avg300=0 total=0\n", 100.0)
    after = snapshot_from_text(
        "workingset_refault_file 26000\npgmajfault 2550\npgscan_kswapd 50010\npgscan_direct 10000\n"
        "pgsteal_kswapd 20005\n",
        "some avg10=0 avg60=0 avg300=0 total=3000000\nfull avg10=0 avg60=0 avg300=0 total=1000000\n",
        "some avg10=0 avg60=0 avg300=0 total=4000000\nfull avg10=0 avg60=0 avg300=0 total=2500000\n", 105.0)

    rates = doctor.compute_rates(before, after, after.counters_read_at_s - before.counters_read_at_s)

    assert rates.refaults_file_per_s == pytest.approx(5000)
    assert rates.major_faults_per_s == pytest.approx(500)
    assert rates.pages_scanned_per_s == pytest.approx(12000)
    assert rates.pages_stolen_per_s == pytest.approx(4000)
    assert rates.psi_percent["memory_some"] == pytest.approx(60.0)
    assert rates.psi_percent["memory_full"] == pytest.approx(20.0)
    assert rates.psi_percent["io_full"] == pytest.approx(50.0)


def test_rates_judged_thrashing_with_cgroup_note():
    breakdown = doctor.build_breakdown(sysmem.read_meminfo(str(SWAP_NODE / "proc")))
    roomy = doctor.Breakdown(breakdown.total_bytes, breakdown.total_bytes // 2, breakdown.categories,
                             breakdown.unaccounted_bytes, breakdown.details)
    rates = doctor.Rates(5.0, 5000.0, 500.0, 12000.0, 4000.0,
                         {"memory_some": 60.0, "memory_full": 20.0, "io_some": 80.0, "io_full": 50.0})

    verdict = doctor.judge(roomy, {"Mapped": 0, "Active(file)": GIB, "Inactive(file)": 0}, {}, rates)

    assert verdict.state == doctor.THRASHING
    fired = {rule.key for rule in verdict.rules if rule.fired}
    assert {"psi_memory_full", "refaults_major_faults", "io_full_refaults"} <= fired
    assert verdict.note is not None
    assert "memory cgroups" in verdict.note


def test_older_kernel_refault_counter_is_used():
    before = doctor.Snapshot(vmstat={"workingset_refault": 100})
    after = doctor.Snapshot(vmstat={"workingset_refault": 600})

    assert doctor.compute_rates(before, after, 5.0).refaults_file_per_s == pytest.approx(100)


def test_sample_rates_skipped_at_interval_zero():
    rates, note = doctor.sample_rates(str(SWAP_NODE / "proc"), 0, doctor.Snapshot())

    assert rates is None
    assert "--interval 0" in note


def test_sample_rates_reads_fixture_twice():
    first = doctor.read_snapshot(str(SWAP_NODE / "proc"), str(SWAP_NODE / "sys"))

    rates, note = doctor.sample_rates(str(SWAP_NODE / "proc"), 1.0, first, sleep=lambda seconds: None)

    assert note is None
    assert rates.refaults_file_per_s == 0
    assert rates.psi_percent["memory_some"] == 0


# Memory cgroups


def test_cgroup_v1_kubepods():
    state = doctor.read_cgroups(str(FIXTURES / "cgroup-v1" / "sys"))

    assert state.version == 1
    assert [group.name for group in state.groups] == ["kubepods"]
    kubepods = state.groups[0]
    assert kubepods.usage_bytes == 16106127360
    assert kubepods.limit_bytes == 60129542144
    assert kubepods.anon_bytes == 11811160064
    assert kubepods.file_bytes == 4294967296
    assert kubepods.kernel_bytes is None
    assert state.note is None


def test_cgroup_v2_kubepods_and_system_slice():
    state = doctor.read_cgroups(str(FIXTURES / "cgroup-v2" / "sys"))

    assert state.version == 2
    groups = {group.name: group for group in state.groups}
    assert set(groups) == {"kubepods.slice", "system.slice"}
    assert groups["kubepods.slice"].limit_bytes == 13958643712
    assert groups["kubepods.slice"].kernel_bytes == 536870912
    assert groups["system.slice"].limit_bytes is None
    assert groups["system.slice"].kernel_bytes == 4194304 + 8388608 + 524288 + 0 + 67108864


def test_cgroup_v2_sizes_system_reserved_from_system_slice():
    report = collect_fixture(SWAP_NODE / "proc", FIXTURES / "cgroup-v2" / "sys")

    commands = recommendation(report, "kubelet_reserved").commands
    assert commands[0] == "--system-reserved=memory=2Gi"


def test_cgroup_v2_without_memory_controller(tmp_path):
    cgroup = tmp_path / "fs" / "cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.controllers").write_text("cpu io pids\n")

    state = doctor.read_cgroups(str(tmp_path))

    assert state.version is None
    assert "no memory cgroup controller" in state.note


def test_cgroup_with_garbage_usage_is_reported(tmp_path):
    shutil.copytree(FIXTURES / "cgroup-v2" / "sys", tmp_path / "sys")
    (tmp_path / "sys/fs/cgroup/system.slice/memory.current").write_text("lots\n")

    state = doctor.read_cgroups(str(tmp_path / "sys"))

    assert [group.name for group in state.groups] == ["kubepods.slice"]
    assert state.note.startswith("system.slice: ")


def test_cgroup_json_fields(empty_sysfs):
    result = run_cli("--json", "--interval", "0", "--procfs-root", str(SWAP_NODE / "proc"),
                     "--sysfs-root", str(FIXTURES / "cgroup-v1" / "sys"))

    cgroups = json.loads(result.stdout)["cgroups"]
    assert cgroups["version"] == 1
    assert cgroups["groups"][0]["usage"]["bytes"] == 16106127360


# Protection state on a fixture procfs


def test_fixture_protection_state():
    protection = doctor.inspect_protection(str(KUBELET_NODE / "proc"), {"Mlocked": 4096}, None)

    assert protection.daemon_pids == (4243,)
    assert [process.comm for process in protection.early_oom] == ["earlyoom"]
    assert protection.mlocked_bytes == 4096
    assert protection.status_note == "not checked: --procfs-root is not /proc"


def test_fixture_kubelet_settings_and_residency():
    protection = doctor.inspect_protection(str(KUBELET_NODE / "proc"), None, None)

    kubelet = protection.kubelet
    assert kubelet.pid == 4242
    assert kubelet.exe == "../../bin/kubelet"
    assert kubelet.size_bytes == (KUBELET_NODE / "bin" / "kubelet").stat().st_size
    assert 0 <= kubelet.cached_bytes <= kubelet.size_bytes
    # The flag wins over the config file, as in kubelet.
    assert kubelet.eviction_hard_memory == "500Mi"
    assert kubelet.system_reserved_memory == "2Gi"


def test_fixture_kubelet_with_reserves_needs_no_kubelet_advice():
    report = collect_fixture(KUBELET_NODE / "proc", FIXTURES / "cgroup-v2" / "sys")

    keys = {item.key for item in report.recommendations}
    assert "kubelet_reserved" not in keys
    assert "run_prelock" not in keys
    assert "early_oom" not in keys


@pytest.mark.parametrize("argv, expected", [
    (("prelock", "run"), True),
    (("/usr/local/bin/prelock", "run", "-c", "/etc/prelock/prelock.yaml"), True),
    (("/usr/bin/python3", "-m", "prelock", "--log-level", "debug", "run"), True),
    (("/opt/prelock/venv/bin/python3.11", "/opt/prelock/venv/bin/prelock", "run"), True),
    (("python3", "-u", "-X", "dev", "-m", "prelock.cli", "run"), True),
    (("python", "-mprelock", "run"), True),
    (("prelock", "doctor"), False),
    (("prelockd", "run"), False),
    (("bash", "-c", "prelock run"), False),
    (("sudo", "prelock", "run"), False),
    (("sudo", "/usr/local/bin/prelock", "run"), False),
    (("timeout", "60", "prelock", "run"), False),
    (("python3", "-c", "import time; time.sleep(60)", "prelock", "run"), False),
    (("python3", "/usr/bin/other-tool", "prelock", "run"), False),
    (("python3", "-m", "pytest", "prelock", "run"), False),
    (("python3",), False),
    ((), False),
])
def test_prelock_run_detection(argv, expected):
    assert doctor.is_prelock_run(argv) is expected


def test_same_argv_wrapper_counted_once():
    argv = ("/usr/bin/python3", "/usr/local/bin/prelock", "run")
    processes = [
        doctor.ProcessInfo(10, "sudo", ("sudo", "prelock", "run"), ppid=1),
        doctor.ProcessInfo(11, "prelock", argv, ppid=10),
        doctor.ProcessInfo(12, "prelock", argv, ppid=11),
        doctor.ProcessInfo(20, "prelock", argv, ppid=1),
    ]

    assert doctor.find_daemons(processes) == (12, 20)


def test_status_file_read(tmp_path):
    (tmp_path / "status.json").write_text(json.dumps({"pid": 77, "locked_bytes": 1 << 20, "updated_at": 0}))

    files = doctor.read_status_files((str(tmp_path), str(tmp_path / "missing")))

    assert len(files) == 1
    assert files[0].pid == 77
    assert files[0].locked_bytes == 1 << 20
    assert files[0].error is None


def test_status_file_invalid_is_reported(tmp_path):
    (tmp_path / "status.json").write_text("{not json")

    files = doctor.read_status_files((str(tmp_path),))

    assert files[0].error.startswith("invalid status file")


@pytest.mark.parametrize("text, reserved, eviction", [
    ("--system-reserved=cpu=1,memory=3Gi", "3Gi", None),
    ("--eviction-hard=nodefs.available<10%,memory.available<1Gi", None, "1Gi"),
    ("--system-reserved cpu=1", None, None),
])
def test_kubelet_flag_parsing(text, reserved, eviction, tmp_path):
    process = doctor.ProcessInfo(1, "kubelet", ("kubelet", *text.split(" ")))

    found_reserved, found_eviction, note = doctor.kubelet_settings(process, str(tmp_path))

    assert found_reserved == reserved
    assert found_eviction == eviction
    assert note is None


def test_kubelet_config_unreadable_is_noted(tmp_path):
    process = doctor.ProcessInfo(1, "kubelet", ("kubelet", "--config", "/etc/kubelet.yaml"))

    reserved, eviction, note = doctor.kubelet_settings(process, str(tmp_path))

    assert reserved is None
    assert eviction is None
    assert note.startswith(f"cannot read kubelet config {tmp_path}/1/root/etc/kubelet.yaml")


# Missing, unreadable and replaced files


def test_empty_procfs_reports_everything_unavailable(tmp_path, empty_sysfs):
    procfs = tmp_path / "proc"
    procfs.mkdir()

    report = collect_fixture(procfs, empty_sysfs)

    assert report.breakdown is None
    assert report.verdict.state == doctor.UNKNOWN
    assert all(not source.available for source in report.snapshot.sources)
    assert {source.error for source in report.snapshot.sources} == {"not found"}


@pytest.mark.parametrize("output", [[], ["--json"]], ids=["text", "json"])
def test_empty_procfs_cli_is_usage_error(tmp_path, empty_sysfs, output):
    procfs = tmp_path / "proc"
    procfs.mkdir()

    result = run_cli(*output, "--interval", "0", "--procfs-root", str(procfs), "--sysfs-root", empty_sysfs)

    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"prelock: cannot read {procfs}/meminfo: not found; is --procfs-root a procfs?\n"


def test_procfs_without_memtotal_is_usage_error(tmp_path, empty_sysfs):
    procfs = tmp_path / "proc"
    procfs.mkdir()
    (procfs / "meminfo").write_text("MemFree: 1 kB\n")

    result = run_cli("--interval", "0", "--procfs-root", str(procfs), "--sysfs-root", empty_sysfs)

    assert result.exit_code == 2
    assert "meminfo: invalid content: no MemTotal line; is --procfs-root a procfs?" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "-1", "3601"])
def test_interval_out_of_range_is_usage_error(value):
    result = run_cli("--interval", value, "--procfs-root", str(GPU_NODE))

    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Invalid value for '--interval'" in result.stderr
    assert "from 0 to 3600" in result.stderr


def test_missing_procfs_root_is_usage_error(tmp_path):
    result = run_cli("--procfs-root", str(tmp_path / "nowhere"))

    assert result.exit_code == 2
    assert "does not exist" in result.output


@pytest.mark.parametrize("make_meminfo, error", [
    (lambda path: path.mkdir(), "read failed"),
    (lambda path: os.mkfifo(path), "read failed: not a regular file"),
    (lambda path: path.write_bytes(b"\x7fELF\x02\x01\x01\x00garbage\n"), "invalid content: no MemTotal line"),
    (lambda path: path.write_text(""), "invalid content: no MemTotal line"),
])
def test_unusable_meminfo_is_unavailable(tmp_path, empty_sysfs, make_meminfo, error):
    procfs = tmp_path / "proc"
    shutil.copytree(SWAP_NODE / "proc", procfs)
    (procfs / "meminfo").unlink()
    make_meminfo(procfs / "meminfo")

    report = collect_fixture(procfs, empty_sysfs)

    meminfo = next(source for source in report.snapshot.sources if source.name == "meminfo")
    assert meminfo.error.startswith(error)
    assert report.breakdown is None
    assert report.verdict.state == doctor.UNDER_PRESSURE  # PSI avg10 still reads 12.4 %


def test_truncated_meminfo_still_adds_up(tmp_path, empty_sysfs):
    procfs = tmp_path / "proc"
    procfs.mkdir()
    text = (GPU_NODE / "meminfo").read_text()
    (procfs / "meminfo").write_text(text[: text.index("KernelStack") + 5])

    breakdown = collect_fixture(procfs, empty_sysfs).breakdown

    assert_adds_up(breakdown)
    assert "kernel_stack" not in {category.key for category in breakdown.categories}


def test_replaced_slabinfo_is_unavailable(tmp_path, empty_sysfs):
    procfs = tmp_path / "proc"
    shutil.copytree(GPU_NODE, procfs)
    (procfs / "slabinfo").write_text("this is not slabinfo\n")

    report = collect_fixture(procfs, empty_sysfs)

    slabinfo = next(source for source in report.snapshot.sources if source.name == "slabinfo")
    assert slabinfo.error.startswith("invalid content: expected a 'slabinfo - version: 2.x' header")
    assert report.holders == ()
    assert report.verdict.state == doctor.THRASHING_RISK


def test_permission_denied_is_explained():
    sources: list[doctor.Source] = []

    def denied():
        raise PermissionError(13, "Permission denied", "/proc/slabinfo")

    assert read_source(sources, "slabinfo", "/proc/slabinfo", denied) is None
    assert sources[0].error == "permission denied (run as root to read it)"


def test_unreadable_inputs_listed_in_text(tmp_path, empty_sysfs):
    result = run_cli("--interval", "0", "--procfs-root", str(GPU_NODE), "--sysfs-root", empty_sysfs)

    words = " ".join(result.output.split())
    assert "Unavailable inputs" in words
    assert f"lru_gen ({empty_sysfs}/kernel/mm/lru_gen): not found" in words


# JSON fields are documented


SIZE_KEYS = {"bytes", "gib", "percent_of_total"}


def json_paths(value, prefix: str = "") -> set[str]:
    """Return the dotted paths of every key, with [] for list items and * for map keys.

    The keys of a size (bytes, gib, percent_of_total) are documented once, so they are
    left out wherever they appear.
    """
    paths = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in SIZE_KEYS and SIZE_KEYS <= value.keys():
                continue
            name = key if prefix not in ("pressure", "sysctls", "rates.psi_percent") else "*"
            path = f"{prefix}.{name}" if prefix else name
            paths.add(path)
            paths |= json_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= json_paths(item, f"{prefix}[]")
    return paths


def test_every_json_field_is_documented(tmp_path):
    documented = set(re.findall(r"`([a-z_\[\]*.0-9]+)`", DOCS.read_text()))
    records = []
    for procfs, sysfs in ((GPU_NODE, tmp_path), (SWAP_NODE / "proc", FIXTURES / "cgroup-v2" / "sys"),
                          (KUBELET_NODE / "proc", FIXTURES / "mglru-node" / "sys")):
        result = run_cli("--json", "--interval", "0", "--procfs-root", str(procfs), "--sysfs-root", str(sysfs))
        records.append(json.loads(result.stdout))
    status = doctor.StatusFile("/var/lib/prelock/status.json", 1, 0, 0.0)
    protection = doctor.inspect_protection(str(KUBELET_NODE / "proc"), None, None)
    with_status = doctor.Protection(protection.daemon_pids, (status,), None, None, protection.kubelet, ())
    records.append({"protection": protection_record(with_status, None)})

    paths = set().union(*(json_paths(record) for record in records))

    # An object whose fields are documented one by one needs no entry of its own.
    undocumented = [path for path in sorted(paths - documented)
                    if not any(name.startswith((path + ".", path + "[")) for name in documented)]
    assert undocumented == []


# The live system


def test_live_breakdown_adds_up_to_memtotal():
    report = doctor.collect("/proc", "/sys", interval_s=0, state_dirs=None)

    meminfo = sysmem.read_meminfo()
    assert report.breakdown is not None
    assert report.breakdown.total_bytes == meminfo["MemTotal"]
    assert_adds_up(report.breakdown)
    # Only swap-cache pages that a process maps can be counted twice (also in AnonPages),
    # so a larger overlap means a category was counted twice.
    assert report.breakdown.unaccounted_bytes >= -meminfo.get("SwapCached", 0)
    assert report.verdict.state in doctor.SEVERITY


def test_live_json_is_valid_and_adds_up():
    result = run_cli("--json", "--interval", "0.2")

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    breakdown = record["breakdown"]
    accounted = sum(category["bytes"] for category in breakdown["categories"])
    assert accounted + breakdown["unaccounted"]["bytes"] == breakdown["total"]["bytes"]
    assert record["rates"]["interval_s"] > 0
    assert record["rates"]["refaults_file_per_s"] >= 0


def test_live_text_output():
    result = run_cli("--interval", "0")

    assert result.exit_code == 0, result.output
    assert "Where the memory is (rows add up to MemTotal)" in result.output
    assert "Recommendations" in result.output


@pytest.fixture
def started(tmp_path):
    """Start processes for a test and end each one by its PID afterwards."""
    processes: list[subprocess.Popen] = []

    def start(argv: list[str]) -> subprocess.Popen:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def named_sleep(tmp_path: Path, name: str) -> Path:
    """Copy sleep(1) under another name, so the process's comm is that name."""
    path = tmp_path / name
    shutil.copy2(shutil.which("sleep"), path)
    return path


def wait_for_comm(pid: int, comm: str) -> None:
    # exec replaces comm once the child has started the copied binary.
    for _ in range(1000):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return
        except FileNotFoundError:
            break
        os.sched_yield()
    pytest.fail(f"process {pid} did not become {comm}")


def test_live_kubelet_residency(tmp_path, started):
    exe = named_sleep(tmp_path, "kubelet")
    process = started([str(exe), "60"])
    wait_for_comm(process.pid, "kubelet")

    ours = [info for info in doctor.scan_processes("/proc") if info.pid == process.pid]
    kubelet = doctor.inspect_kubelet(ours, "/proc")

    assert kubelet.pid == process.pid
    assert kubelet.exe == str(exe)
    assert kubelet.size_bytes == exe.stat().st_size
    # exec read the binary, so at least its first page is in the page cache.
    assert kubelet.cached_bytes > 0
    assert kubelet.cached_bytes <= kubelet.size_bytes


def test_live_residency_cachestat_and_mincore_agree(tmp_path, started):
    exe = named_sleep(tmp_path, "kubelet")
    process = started([str(exe), "60"])
    wait_for_comm(process.pid, "kubelet")

    by_mincore = doctor.measure_file(f"/proc/{process.pid}/exe", "mincore")

    assert by_mincore.size_bytes == exe.stat().st_size
    assert 0 < by_mincore.cached_pages <= by_mincore.pages
    if native.has_cachestat():
        by_cachestat = doctor.measure_file(f"/proc/{process.pid}/exe", "cachestat")
        assert by_cachestat.cached_pages == by_mincore.cached_pages


def fake_prelock(tmp_path: Path, body: str) -> Path:
    """Write a Python script named prelock that runs body, so `python .../prelock run` runs it."""
    path = tmp_path / "bin" / "prelock"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"import os, subprocess, sys, time\n{body}\n")
    return path


def wait_for_child_running(pid: int, script: Path) -> int:
    """Return the PID of pid's child once the child has exec'd the interpreter on script."""
    for _ in range(100000):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if children and str(script).encode() in Path(f"/proc/{children[0]}/cmdline").read_bytes():
                return int(children[0])
        except FileNotFoundError:
            break
        os.sched_yield()
    pytest.fail(f"process {pid} did not start {script}")


def our_daemons(protection: doctor.Protection, pids: set[int]) -> set[int]:
    return set(protection.daemon_pids) & pids


def test_live_prelock_daemon_and_early_oom_found(tmp_path, started):
    script = fake_prelock(tmp_path, "time.sleep(60)")
    daemon = started([sys.executable, str(script), "run"])
    earlyoom = started([str(named_sleep(tmp_path, "earlyoom")), "60"])
    wait_for_comm(earlyoom.pid, "earlyoom")

    protection = doctor.inspect_protection("/proc", None, None)

    assert daemon.pid in protection.daemon_pids
    assert earlyoom.pid in [process.pid for process in protection.early_oom]


def test_live_shell_wrapper_not_counted(tmp_path, started):
    script = fake_prelock(tmp_path, "time.sleep(60)")
    # The shell's own argv names prelock and run. The trailing `; exit` keeps the shell
    # alive as the daemon's parent instead of exec'ing the daemon.
    shell = started(["sh", "-c", '"$0" "$@"; exit 0', sys.executable, str(script), "run"])
    daemon_pid = wait_for_child_running(shell.pid, script)
    try:
        protection = doctor.inspect_protection("/proc", None, None)
    finally:
        os.kill(daemon_pid, signal.SIGKILL)

    assert our_daemons(protection, {shell.pid, daemon_pid}) == {daemon_pid}


def test_live_same_argv_wrapper_not_counted(tmp_path, started):
    # The script runs itself again as a child with the same argv, as a wrapper might.
    script = fake_prelock(tmp_path, "if os.environ.get('FAKE_PRELOCK_CHILD'):\n"
                                    "    time.sleep(60)\n"
                                    "else:\n"
                                    "    os.environ['FAKE_PRELOCK_CHILD'] = '1'\n"
                                    "    subprocess.run([sys.executable, *sys.argv])\n")
    parent = started([sys.executable, str(script), "run"])
    child_pid = wait_for_child_running(parent.pid, script)
    try:
        protection = doctor.inspect_protection("/proc", None, None)
    finally:
        os.kill(child_pid, signal.SIGKILL)

    assert our_daemons(protection, {parent.pid, child_pid}) == {child_pid}


def test_live_status_file_in_config_state_dir(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "status.json").write_text(json.dumps({"pid": 77, "locked_bytes": 4096, "updated_at": 0}))
    config = tmp_path / "prelock.yaml"
    config.write_text(f"state_dir: {state_dir}\n")

    result = run_cli("--json", "--interval", "0", "-c", str(config))

    assert result.exit_code == 0, result.output
    status_files = json.loads(result.stdout)["protection"]["status_files"]
    assert status_files[0]["path"] == str(state_dir / "status.json")
    assert status_files[0]["locked_bytes"] == 4096


def test_invalid_config_option_is_usage_error(tmp_path):
    config = tmp_path / "prelock.yaml"
    config.write_text("state_dir: relative\n")

    result = run_cli("--interval", "0", "-c", str(config))

    assert result.exit_code == 2
    assert f"{config}:1: state_dir: not an absolute path" in result.stderr


def test_status_file_of_dead_daemon_not_running(tmp_path):
    from prelock.doctor_node import read_status_files

    # PID 2**22 + 1 is above the kernel's pid_max ceiling, so no process has it.
    (tmp_path / "status.json").write_text('{"pid": 4194305, "locked_bytes": 0, "updated_at": 0}')
    (found,) = read_status_files((str(tmp_path),))
    assert found.running is False
    assert found.pid == 4194305


def test_status_file_marked_stopped_not_running(tmp_path):
    from prelock.doctor_node import read_status_files

    (tmp_path / "status.json").write_text(f'{{"pid": {os.getpid()}, "locked_bytes": 0, "running": false}}')
    (found,) = read_status_files((str(tmp_path),))
    assert found.running is False
