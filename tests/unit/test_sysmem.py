"""Parsers and readers of prelock.sysmem, on literal fixtures and hostile files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prelock import sysmem

FIXTURES = Path(__file__).parent.parent / "fixtures" / "doctor"

MEMINFO = """\
MemTotal:       24683784 kB
MemFree:        24316380 kB
MemAvailable:   24354284 kB
Active(anon):         32 kB
HugePages_Total:       4
Hugepagesize:       2048 kB
"""

SLABINFO_HEADER = """\
slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
"""


def test_meminfo_kb_lines_become_bytes():
    values = sysmem.parse_meminfo(MEMINFO)

    assert values["MemTotal"] == 24683784 * 1024
    assert values["Active(anon)"] == 32 * 1024
    assert values["Hugepagesize"] == 2048 * 1024


def test_meminfo_lines_without_unit_stay_counts():
    values = sysmem.parse_meminfo(MEMINFO)

    assert values["HugePages_Total"] == 4


def test_meminfo_skips_truncated_and_garbage_lines():
    text = "MemTotal:       1000 kB\nnot a field\nWeird:    12 MB\nMemFree:   \nMemAvail"

    values = sysmem.parse_meminfo(text)

    assert values == {"MemTotal": 1000 * 1024}


def test_meminfo_of_empty_text_is_empty():
    assert sysmem.parse_meminfo("") == {}


def test_read_meminfo_reads_live_proc():
    values = sysmem.read_meminfo()

    assert values["MemTotal"] > 0
    assert values["MemFree"] <= values["MemTotal"]


def test_vmstat_parses_counters_and_skips_garbage():
    text = "nr_free_pages 979563\nworkingset_refault_file 43100\nbroken\npgmajfault x\n"

    values = sysmem.parse_vmstat(text)

    assert values == {"nr_free_pages": 979563, "workingset_refault_file": 43100}


def test_slabinfo_parses_cache_and_size():
    text = SLABINFO_HEADER + (
        "kmalloc-64                     67912    69760     64   64    1 : tunables    0    0    0 : "
        "slabdata   1090   1090      0\n")

    caches = sysmem.parse_slabinfo(text)

    assert len(caches) == 1
    cache = caches[0]
    assert cache.name == "kmalloc-64"
    assert cache.active_objects == 67912
    assert cache.total_objects == 69760
    assert cache.object_size_bytes == 64
    assert cache.pages_per_slab == 1
    assert cache.total_slabs == 1090
    assert cache.size_bytes(4096) == 1090 * 4096


def test_slabinfo_drops_repeated_identical_lines():
    caches = sysmem.parse_slabinfo((FIXTURES / "gpu-node-livelock" / "slabinfo").read_text())

    names = [cache.name for cache in caches]
    assert names.count("nvidia_pte_cache-2782818403") == 1
    assert len(names) == len(set(names))


def test_slabinfo_skips_malformed_and_truncated_lines():
    text = SLABINFO_HEADER + (
        "dentry 28017 61698 192 39 2 : tunables 0 0 0 : slabdata 1582 1582 0\n"
        "broken 1 2 3\n"
        "shifted 1 2 3 4 5 6 : tunables 0 0 0 : slabdata 1 1 0\n"
        "task_struct 1126 1170 8384 3 8 : tunables 0 0")

    caches = sysmem.parse_slabinfo(text)

    assert [cache.name for cache in caches] == ["dentry"]


def test_slabinfo_rejects_other_formats():
    with pytest.raises(ValueError, match="slabinfo - version: 2.x"):
        sysmem.parse_slabinfo("slabinfo - version: 1.1\n")
    with pytest.raises(ValueError, match="slabinfo - version: 2.x"):
        sysmem.parse_slabinfo("")


def test_pressure_parses_some_and_full():
    text = ("some avg10=12.40 avg60=8.10 avg300=3.02 total=98312455\n"
            "full avg10=2.10 avg60=1.50 avg300=0.60 total=20112345\n")

    pressure = sysmem.parse_pressure(text)

    assert pressure.some.avg10 == pytest.approx(12.40)
    assert pressure.some.total_us == 98312455
    assert pressure.full is not None
    assert pressure.full.avg300 == pytest.approx(0.60)


def test_pressure_without_full_line():
    pressure = sysmem.parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")

    assert pressure.full is None


def test_pressure_without_some_line_is_invalid():
    with pytest.raises(ValueError, match="some"):
        sysmem.parse_pressure("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_modules_parses_dependents_and_sizes():
    text = ("nvidia_uvm 1884160 2 - Live 0x0000000000000000 (POE)\n"
            "nvidia 56823808 19 nvidia_uvm,nvidia_modeset, Live 0x0000000000000000 (POE)\n"
            "garbage line\n")

    modules = sysmem.parse_modules(text)

    assert [module.name for module in modules] == ["nvidia_uvm", "nvidia"]
    assert modules[0].used_by == ()
    assert modules[1].used_by == ("nvidia_uvm", "nvidia_modeset")
    assert modules[1].size_bytes == 56823808
    assert modules[1].state == "Live"


def test_swaps_unescapes_paths_and_converts_kib():
    areas = sysmem.read_swaps(str(FIXTURES / "swap-node" / "proc"))

    assert [area.path for area in areas] == ["/dev/nvme0n1p3", "/var/lib/swap file"]
    assert areas[0].kind == "partition"
    assert areas[0].size_bytes == 4194300 * 1024
    assert areas[1].used_bytes == 1048576 * 1024
    assert areas[1].priority == -3


def test_swaps_without_areas_is_empty():
    assert sysmem.parse_swaps("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n") == []


def test_sysctl_int_rejects_text():
    assert sysmem.parse_sysctl_int("67584\n") == 67584
    with pytest.raises(ValueError, match="integer"):
        sysmem.parse_sysctl_int("abc\n")


def test_read_vm_sysctls_from_fixture():
    procfs = str(FIXTURES / "swap-node" / "proc")

    values = {name: sysmem.read_vm_sysctl(name, procfs) for name in sysmem.VM_SYSCTLS}

    assert values["min_free_kbytes"] == 67584
    assert values["swappiness"] == 60


def test_lru_gen_reads_mask_and_ttl():
    lru_gen = sysmem.read_lru_gen(str(FIXTURES / "mglru-node" / "sys"))

    assert lru_gen.enabled_mask == 0x7
    assert lru_gen.enabled
    assert lru_gen.min_ttl_ms == 0


def test_lru_gen_main_switch_off():
    assert not sysmem.LruGen(enabled_mask=0x6, min_ttl_ms=0).enabled


def test_lru_gen_missing_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        sysmem.read_lru_gen(str(tmp_path))


def test_lru_gen_enabled_rejects_garbage():
    with pytest.raises(ValueError, match="hex mask"):
        sysmem.parse_lru_gen_enabled("yes\n")


def test_reader_rejects_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "meminfo")

    with pytest.raises(OSError, match="not a regular file"):
        sysmem.read_meminfo(str(tmp_path))


def test_reader_rejects_directory(tmp_path):
    (tmp_path / "vmstat").mkdir()

    with pytest.raises(OSError):
        sysmem.read_vmstat(str(tmp_path))


def test_reader_survives_non_utf8_bytes(tmp_path):
    (tmp_path / "meminfo").write_bytes(b"MemTotal:  1000 kB\n\xff\xfe:  12 kB\n")

    values = sysmem.read_meminfo(str(tmp_path))

    assert values["MemTotal"] == 1000 * 1024
