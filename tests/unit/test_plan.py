"""build_plan on literal scan results: order, budget, floor, file size and modes."""

from __future__ import annotations

import pytest

from prelock.config import parse_config
from prelock.native import PAGE_SIZE
from prelock.plan import MemoryState, build_plan, budget_bytes, merge_ranges
from prelock.scan import FileUsage, ScanResult

GIB = 1 << 30
MIB = 1 << 20


def usage(inode: int, tier: str, present_pages: int, size_pages: int = 1000, owners: int = 1) -> FileUsage:
    return FileUsage(
        key=(1, inode),
        path=f"/usr/lib/file{inode}",
        size_bytes=size_pages * PAGE_SIZE,
        tier=tier,
        executable=True,
        owners={100 + i: "proc" for i in range(owners)},
        mapped=[(0, size_pages // 2)],
        present=[(0, present_pages)] if present_pages else [],
    )


def scan_of(*usages: FileUsage) -> ScanResult:
    return ScanResult({u.key: u for u in usages}, [])


def memory(total: int = 16 * GIB, available: int = 12 * GIB, held: int = 0, limit: int | None = None) -> MemoryState:
    return MemoryState(total_bytes=total, available_bytes=available, held_bytes=held, cgroup_limit_bytes=limit)


def config(text: str = ""):
    return parse_config(text)


def test_plan_critical_before_others():
    scan = scan_of(usage(1, "others", 10, owners=50), usage(2, "critical", 10), usage(3, "others", 10))
    plan = build_plan(scan, config(), memory())
    assert [f.tier for f in plan.files] == ["critical", "others", "others"]
    assert plan.files[1].key == (1, 1)  # more owners first within a tier


def test_plan_budget_skips_what_does_not_fit():
    pages_per_mib = MIB // PAGE_SIZE
    scan = scan_of(usage(1, "critical", 3 * pages_per_mib, size_pages=4 * pages_per_mib),
                   usage(2, "others", 3 * pages_per_mib, size_pages=4 * pages_per_mib),
                   usage(3, "others", pages_per_mib, size_pages=4 * pages_per_mib))
    plan = build_plan(scan, config("lock:\n  budget: 4MiB\n"), memory())
    assert [f.key for f in plan.files] == [(1, 1), (1, 3)]
    assert sum(f.planned_bytes for f in plan.files) <= 4 * MIB
    skipped = {s.key: s.reason for s in plan.skipped}
    assert skipped[(1, 2)] == "over budget"


def test_plan_min_available_floor():
    scan = scan_of(usage(1, "critical", 256))
    # 1 GiB floor (5 % of 20 GiB) and 1 GiB + 512 KiB available: only 512 KiB may be locked.
    plan = build_plan(scan, config(), memory(total=20 * GIB, available=GIB + 512 * 1024))
    assert plan.files == ()
    assert plan.skipped[0].reason == "min_available floor"


def test_plan_held_bytes_count_against_floor_not_twice():
    scan = scan_of(usage(1, "critical", 256))
    plan = build_plan(scan, config(), memory(total=20 * GIB, available=GIB, held=2 * MIB))
    assert [f.key for f in plan.files] == [(1, 1)]


def test_plan_max_file_size():
    scan = scan_of(usage(1, "critical", 10, size_pages=(2 * GIB) // PAGE_SIZE))
    plan = build_plan(scan, config(), memory())
    assert plan.files == ()
    assert plan.skipped[0].reason == "larger than lock.max_file_size"


@pytest.mark.parametrize(("mode", "expected_pages"), [
    ("working-set", 10),
    ("mapped", 500),
    ("whole-file", 1000),
])
def test_plan_modes(mode: str, expected_pages: int):
    plan = build_plan(scan_of(usage(1, "critical", 10)), config(f"lock:\n  mode: {mode}\n"), memory())
    assert plan.files[0].pages_planned == expected_pages


def test_plan_empty_working_set_not_planned():
    plan = build_plan(scan_of(usage(1, "critical", 0)), config(), memory())
    assert plan.files == ()


def test_budget_percent_and_cgroup_cap():
    assert budget_bytes(config("lock:\n  budget: 10%\n"), memory(total=10 * GIB)) == GIB
    capped = budget_bytes(config("lock:\n  budget: 10%\n"), memory(total=10 * GIB, limit=512 * MIB))
    assert capped == 512 * MIB - 128 * MIB


def test_merge_ranges():
    assert merge_ranges([(5, 7), (0, 2), (2, 3), (6, 9), (20, 21)]) == [(0, 3), (5, 9), (20, 21)]
    assert merge_ranges([]) == []
