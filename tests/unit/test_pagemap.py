"""Tests of the pagemap and kpageflags decoding in prelock.pagemap on literal entries."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from prelock import pagemap
from prelock.errors import ProcessGone

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE_OR_SHARED_ANON = 1 << 61
EXCLUSIVE = 1 << 56
SOFT_DIRTY = 1 << 55


def pack(*values: int) -> bytes:
    # x86_64 is little-endian, and the kernel writes each entry as a native u64.
    return struct.pack(f"<{len(values)}Q", *values)


# (entry, present and file-backed, PFN that pfns() returns)
ENTRY_CASES = [
    pytest.param(PRESENT | FILE_OR_SHARED_ANON | 0x1234, 1, 0x1234, id="present-file"),
    pytest.param(PRESENT | FILE_OR_SHARED_ANON | EXCLUSIVE | SOFT_DIRTY | 0x1234, 1, 0x1234,
                 id="present-file-flag-bits"),
    pytest.param(PRESENT | FILE_OR_SHARED_ANON, 1, 0, id="present-file-pfn-hidden"),
    pytest.param(PRESENT | EXCLUSIVE | 0x5678, 0, 0x5678, id="present-anon-cow"),
    pytest.param(SWAPPED | (0x2A << 5) | 1, 0, 0, id="swapped"),
    pytest.param(SWAPPED | FILE_OR_SHARED_ANON | (0x2A << 5), 0, 0, id="swapped-shmem"),
    pytest.param(FILE_OR_SHARED_ANON, 0, 0, id="file-bit-not-present"),
    pytest.param(0, 0, 0, id="absent"),
]


@pytest.mark.parametrize(("entry", "present_file", "pfn"), ENTRY_CASES)
def test_present_file_page(entry: int, present_file: int, pfn: int):
    assert pagemap.present_file_pages(pack(entry)) == bytes([present_file])


@pytest.mark.parametrize(("entry", "present_file", "pfn"), ENTRY_CASES)
def test_pfn_of_entry(entry: int, present_file: int, pfn: int):
    assert pagemap.pfns(pack(entry)) == [pfn]


def test_present_file_pages_sequence():
    raw = pack(PRESENT | FILE_OR_SHARED_ANON | 7, PRESENT | 8, SWAPPED | (3 << 5), 0,
               PRESENT | FILE_OR_SHARED_ANON | 9)
    assert pagemap.present_file_pages(raw) == b"\x01\x00\x00\x00\x01"


def test_pfns_sequence():
    raw = pack(PRESENT | FILE_OR_SHARED_ANON | 7, PRESENT | 8, SWAPPED | (3 << 5), 0)
    assert pagemap.pfns(raw) == [7, 8, 0, 0]


def test_pfn_uses_55_bits():
    assert pagemap.pfns(pack(PRESENT | (1 << 54) | 1)) == [(1 << 54) | 1]


def test_present_file_pages_empty():
    assert pagemap.present_file_pages(b"") == b""


@pytest.mark.parametrize(("flags", "expected"), [
    pytest.param(b"", [], id="empty"),
    pytest.param(b"\x00\x00\x00", [], id="none"),
    pytest.param(b"\x01\x01\x01", [(0, 3)], id="all"),
    pytest.param(b"\x01\x01\x00\x01", [(0, 2), (3, 4)], id="two-runs"),
    pytest.param(b"\x00\x01\x00\x00\x01\x01", [(1, 2), (4, 6)], id="runs-to-end"),
])
def test_runs(flags: bytes, expected: list[tuple[int, int]]):
    assert pagemap.runs(flags) == expected


@pytest.mark.parametrize(("sorted_pfns", "expected"), [
    pytest.param([7], [(7, 8)], id="single"),
    pytest.param([1, 2, 3], [(1, 4)], id="adjacent"),
    pytest.param([10, 20], [(10, 21)], id="small-gap-bridged"),
    pytest.param([10, 10 + 64], [(10, 75)], id="distance-64-bridged"),
    pytest.param([10, 10 + 65], [(10, 11), (75, 76)], id="distance-65-split"),
    pytest.param([1, 2, 500, 501, 2000], [(1, 3), (500, 502), (2000, 2001)], id="three-groups"),
])
def test_pfn_ranges(sorted_pfns: list[int], expected: list[tuple[int, int]]):
    assert pagemap._pfn_ranges(sorted_pfns) == expected


def test_pfn_ranges_cover_every_pfn():
    sorted_pfns = [3, 4, 90, 91, 92, 160, 161, 5000]
    ranges = pagemap._pfn_ranges(sorted_pfns)
    for pfn in sorted_pfns:
        assert any(first <= pfn < last for first, last in ranges), f"PFN {pfn} not in {ranges}"
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_is_mlocked():
    assert pagemap.is_mlocked(1 << pagemap.KPF_MLOCKED)
    assert not pagemap.is_mlocked(1 << pagemap.KPF_UNEVICTABLE)
    assert not pagemap.is_mlocked(0)


# --- readers on fixture files -----------------------------------------------------

def test_read_pagemap_slice(tmp_path: Path):
    entries = [PRESENT | FILE_OR_SHARED_ANON | (100 + index) for index in range(32)]
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "pagemap").write_bytes(pack(*entries))

    raw = pagemap.read_pagemap(42, 4 * PAGE_SIZE, 10 * PAGE_SIZE, procfs=str(tmp_path))
    assert len(raw) == 6 * pagemap.ENTRY_BYTES
    assert pagemap.pfns(raw) == [104, 105, 106, 107, 108, 109]


def test_read_pagemap_pid_vanished(tmp_path: Path):
    with pytest.raises(ProcessGone) as caught:
        pagemap.read_pagemap(42, 0, PAGE_SIZE, procfs=str(tmp_path))
    assert caught.value.pid == 42


def test_read_kpageflags(tmp_path: Path):
    flags = [index << 8 for index in range(300)]
    flags[5] |= 1 << pagemap.KPF_MLOCKED
    (tmp_path / "kpageflags").write_bytes(pack(*flags))

    result = pagemap.read_kpageflags([200, 5, 0, 6, 5], procfs=str(tmp_path))
    assert sorted(result) == [5, 6, 200]
    assert result[6] == 6 << 8
    assert result[200] == 200 << 8
    assert pagemap.is_mlocked(result[5])
    assert not pagemap.is_mlocked(result[6])


def test_read_kpageflags_pfn_past_end(tmp_path: Path):
    (tmp_path / "kpageflags").write_bytes(pack(*range(10)))
    assert pagemap.read_kpageflags([3, 50], procfs=str(tmp_path)) == {3: 3, 50: 0}


def test_read_kpageflags_only_zero_pfns(tmp_path: Path):
    # PFN 0 means "hidden or absent", so nothing is read and the file need not exist.
    assert pagemap.read_kpageflags([0, 0], procfs=str(tmp_path)) == {}
