"""The locker against the real kernel: page flags from /proc/kpageflags are the ground truth.

Each test writes files of its own on a disk filesystem and maps them from a child process
it starts (map_file -n, which maps without touching a page). It builds PlannedFile values
pointing at that child and checks PG_mlocked (kpageflags bit 33) on the PFNs of the
locker's own mapping.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import procs
from prelock import native, pagemap, procfs
from prelock.locker import (REASON_KEY_CHANGED, REASON_MEMLOCK, REASON_OVER_BUDGET,
                            REASON_VMA_LIMIT, HeldFile, Locker, read_max_map_count,
                            read_pmd_size)
from prelock.plan import FileSource, PlannedFile

pytestmark = pytest.mark.root

PAGE_SIZE = native.PAGE_SIZE
CAP_IPC_LOCK = 14

if not native.has_populate_read():
    pytest.skip("madvise(MADV_POPULATE_READ) needs Linux 5.14 or later", allow_module_level=True)


# --- fixtures and helpers -----------------------------------------------------------


@pytest.fixture(autouse=True)
def one_cpu() -> Iterator[None]:
    """Pin the test to one CPU, so drain_munlock() flushes the CPU that queued the munlocks."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    yield
    os.sched_setaffinity(0, saved)


@pytest.fixture
def locker() -> Iterator[Locker]:
    held_set = Locker()
    yield held_set
    held_set.release_all()


@pytest.fixture
def mapper(map_file_program: Path) -> Iterator:
    """Start one map_file child per path; return (pid, Mapping) for the path."""
    with contextlib.ExitStack() as stack:
        def start(path: Path) -> tuple[int, procfs.Mapping]:
            spawned = stack.enter_context(procs.spawn([map_file_program, "-n", path], ready_line="ready"))
            return spawned.pid, find_mapping(spawned.pid, path)

        yield start


def find_mapping(pid: int, path: Path) -> procfs.Mapping:
    st = os.stat(path)
    for mapping in procfs.read_maps(pid):
        if (mapping.dev, mapping.inode) == (st.st_dev, st.st_ino):
            return mapping
    raise AssertionError(f"process {pid} does not map {path}")


def write_file(path: Path, pages: int, cached: bool = False, mode: str = "wb") -> Path:
    """Write pages pages and drop the file from the page cache, or read it back with read().

    A dropped file comes back in single-page folios when the locker faults it in, because
    its mapping is MADV_RANDOM, so each planned page maps and locks just itself.
    """
    with open(path, mode) as f:
        for index in range(pages):
            f.write(bytes([index % 251 + 1]) * PAGE_SIZE)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cached:
        # Reading with read() fills the page cache through readahead, in large folios.
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    return path


def file_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def planned(path: Path, source: tuple[int, procfs.Mapping], extents, tier: str = "critical",
            key: tuple[int, int] | None = None) -> PlannedFile:
    pid, mapping = source
    size_bytes = os.stat(path).st_size
    pages = sum(last - first for first, last in extents)
    return PlannedFile(key=key or file_key(path), path=str(path), tier=tier, size_bytes=size_bytes,
                       extents=tuple(extents), pages_planned=pages,
                       pages_mapped=-(-size_bytes // PAGE_SIZE), owners=((pid, "map_file"),),
                       sources=(FileSource(pid, mapping),))


def mlocked_pages(held: HeldFile) -> set[int]:
    """Return the page indexes of held's mapping whose page is PG_mlocked."""
    raw = pagemap.read_pagemap("self", held.addr, held.addr + held.length_bytes)
    page_pfns = pagemap.pfns(raw)
    flags = pagemap.read_kpageflags(page_pfns)
    return {index for index, pfn in enumerate(page_pfns) if pfn and pagemap.is_mlocked(flags[pfn])}


def pfns_of(held: HeldFile) -> list[int]:
    raw = pagemap.read_pagemap("self", held.addr, held.addr + held.length_bytes)
    return [pfn for pfn in pagemap.pfns(raw) if pfn]


def count_mlocked(pfn_list: list[int]) -> int:
    flags = pagemap.read_kpageflags(pfn_list)
    return sum(pagemap.is_mlocked(flags[pfn]) for pfn in pfn_list)


def pages_in(extents) -> set[int]:
    return {page for first, last in extents for page in range(first, last)}


def own_mappings_of(path: Path) -> list[procfs.Mapping]:
    """Return the lines of /proc/self/maps that map path."""
    key = file_key(path)
    return [m for m in procfs.read_maps(os.getpid()) if (m.dev, m.inode) == key]


def drain_munlock() -> None:
    """Flush this CPU's batch of pending munlocks.

    munmap queues small folios in a per-CPU batch and clears PG_mlocked only when the
    batch is flushed. Every munmap starts by flushing that batch, so unmapping a
    throwaway anonymous page makes the earlier munlocks visible in kpageflags.
    """
    throwaway = mmap.mmap(-1, PAGE_SIZE)
    throwaway[0] = 1
    throwaway.close()


# --- one file, many extents ---------------------------------------------------------


def test_lock_one_file(locker, mapper, disk_dir, caplog):
    path = write_file(disk_dir / "one.bin", 64)
    plan = planned(path, mapper(path), [(0, 64)])

    with caplog.at_level(logging.DEBUG, logger="prelock.locker"):
        report = locker.apply([plan], budget_bytes=1 << 30)

    assert report.locked == [(plan.key, str(path))]
    assert report.skipped == []
    assert not report.memlock_limited
    held = locker.held[plan.key]
    assert held.length_bytes == 64 * PAGE_SIZE
    assert held.extents == ((0, 64),)
    assert mlocked_pages(held) == set(range(64))
    assert held.locked_bytes == 64 * PAGE_SIZE
    assert locker.total_locked_bytes() == 64 * PAGE_SIZE
    assert report.locked_bytes_by_tier == {"critical": 64 * PAGE_SIZE, "others": 0}
    assert any(r.getMessage().startswith(f"locked {path} pages=64/64 size=256.0KiB tier=critical")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_release_unlocks_pages(locker, mapper, disk_dir):
    path = write_file(disk_dir / "release.bin", 32)
    plan = planned(path, mapper(path), [(0, 32)])
    locker.apply([plan], budget_bytes=1 << 30)
    page_pfns = pfns_of(locker.held[plan.key])
    assert count_mlocked(page_pfns) == 32

    released = locker.release(plan.key)
    drain_munlock()

    assert released is not None and released.key == plan.key
    assert plan.key not in locker.held
    assert count_mlocked(page_pfns) == 0
    assert own_mappings_of(path) == []
    assert locker.release(plan.key) is None


def test_many_extents_use_one_vma(locker, mapper, disk_dir):
    path = write_file(disk_dir / "extents.bin", 256)
    extents = [(0, 1), (10, 12), (50, 60), (100, 101), (130, 140), (200, 256)]
    plan = planned(path, mapper(path), extents)

    locker.apply([plan], budget_bytes=1 << 30)

    held = locker.held[plan.key]
    lines = own_mappings_of(path)
    assert len(lines) == 1
    assert (lines[0].start, lines[0].end) == (held.addr, held.addr + 256 * PAGE_SIZE)
    locked = mlocked_pages(held)
    assert pages_in(extents) <= locked
    assert held.locked_bytes == len(locked) * PAGE_SIZE


def test_release_all_unmaps_every_file(locker, mapper, disk_dir):
    paths = [write_file(disk_dir / f"all{index}.bin", 8) for index in range(3)]
    plans = [planned(path, mapper(path), [(0, 8)]) for path in paths]
    locker.apply(plans, budget_bytes=1 << 30)
    assert len(locker.held) == 3

    locker.release_all()

    assert dict(locker.held) == {}
    assert locker.total_locked_bytes() == 0
    for path in paths:
        assert own_mappings_of(path) == [], path


# --- budget and folios ----------------------------------------------------------------


def test_budget_skips_file_that_does_not_fit(locker, mapper, disk_dir):
    paths = [write_file(disk_dir / f"budget{index}.bin", 32) for index in range(3)]
    plans = [planned(path, mapper(path), [(0, 32)]) for path in paths]
    budget_bytes = 80 * PAGE_SIZE

    report = locker.apply(plans, budget_bytes)

    assert [key for key, _ in report.locked] == [plans[0].key, plans[1].key]
    assert report.skipped == [(plans[2].key, str(paths[2]), REASON_OVER_BUDGET)]
    assert locker.total_locked_bytes() == 64 * PAGE_SIZE
    assert own_mappings_of(paths[2]) == []


def test_budget_releases_file_over_after_populate(locker, mapper, disk_dir):
    first_path = write_file(disk_dir / "first.bin", 16)
    cached_path = write_file(disk_dir / "cached.bin", 64, cached=True)
    first = planned(first_path, mapper(first_path), [(0, 16)])
    # One page fits the budget, but faulting it in maps and locks its whole
    # fault-around window of the cached file.
    cached = planned(cached_path, mapper(cached_path), [(8, 9)])
    budget_bytes = 18 * PAGE_SIZE

    report = locker.apply([first, cached], budget_bytes)

    assert report.locked == [(first.key, str(first_path))]
    assert report.skipped == [(cached.key, str(cached_path), REASON_OVER_BUDGET)]
    assert cached.key not in locker.held
    assert own_mappings_of(cached_path) == []
    assert locker.total_locked_bytes() <= budget_bytes
    assert locker.refresh_locked() <= budget_bytes


def test_locked_bytes_follow_folios(locker, mapper, disk_dir):
    path = write_file(disk_dir / "folio.bin", 512, cached=True)
    plan = planned(path, mapper(path), [(100, 101)])

    report = locker.apply([plan], budget_bytes=1 << 30)

    held = locker.held[plan.key]
    locked = mlocked_pages(held)
    assert held.addr % read_pmd_size() == 0
    assert 100 in locked
    assert len(locked) > 1, "expected the fault to map more than the one planned page"
    assert held.locked_bytes == len(locked) * PAGE_SIZE
    assert report.locked_bytes_by_tier["critical"] == held.locked_bytes
    assert locker.refresh_locked() == held.locked_bytes


# --- files that change ----------------------------------------------------------------


def test_truncate_while_locked(locker, mapper, disk_dir):
    path = write_file(disk_dir / "truncate.bin", 64)
    plan = planned(path, mapper(path), [(0, 64)])
    locker.apply([plan], budget_bytes=1 << 30)
    assert locker.held[plan.key].locked_bytes == 64 * PAGE_SIZE

    os.truncate(path, 0)

    assert locker.refresh_locked() == 0
    assert locker.held[plan.key].locked_bytes == 0
    report = locker.apply([plan], budget_bytes=1 << 30)
    assert report.changed == [(plan.key, str(path))]
    assert report.skipped == []
    assert plan.key not in locker.held
    assert own_mappings_of(path) == []


def test_file_shorter_than_plan_is_changed(locker, mapper, disk_dir):
    path = write_file(disk_dir / "shrunk.bin", 64)
    plan = planned(path, mapper(path), [(0, 64)])
    os.truncate(path, 16 * PAGE_SIZE)

    report = locker.apply([plan], budget_bytes=1 << 30)

    assert report.changed == [(plan.key, str(path))]
    assert plan.key not in locker.held
    assert own_mappings_of(path) == []


def test_grow_extents_in_same_mapping(locker, mapper, disk_dir):
    path = write_file(disk_dir / "grow.bin", 128)
    source = mapper(path)
    locker.apply([planned(path, source, [(0, 8)])], budget_bytes=1 << 30)
    before = locker.held[file_key(path)]

    report = locker.apply([planned(path, source, [(0, 8), (64, 80)])], budget_bytes=1 << 30)

    held = locker.held[file_key(path)]
    assert report.grown == [(held.key, str(path))]
    assert report.locked == []
    assert held.addr == before.addr
    assert held.extents == ((0, 8), (64, 80))
    assert pages_in(held.extents) <= mlocked_pages(held)
    assert len(own_mappings_of(path)) == 1


def test_shrunk_extents_stay_locked(locker, mapper, disk_dir):
    path = write_file(disk_dir / "shrink.bin", 128)
    source = mapper(path)
    locker.apply([planned(path, source, [(0, 8), (64, 80)])], budget_bytes=1 << 30)

    report = locker.apply([planned(path, source, [(0, 8)])], budget_bytes=1 << 30)

    held = locker.held[file_key(path)]
    assert report.grown == []
    assert held.extents == ((0, 8), (64, 80))
    assert pages_in([(64, 80)]) <= mlocked_pages(held)


def test_grow_past_mapping_remaps(locker, mapper, disk_dir):
    path = write_file(disk_dir / "append.bin", 128)
    source = mapper(path)
    locker.apply([planned(path, source, [(0, 8), (64, 80)])], budget_bytes=1 << 30)
    write_file(path, 64, mode="ab")

    report = locker.apply([planned(path, source, [(150, 160)])], budget_bytes=1 << 30)

    held = locker.held[file_key(path)]
    assert report.grown == [(held.key, str(path))]
    assert held.length_bytes == 192 * PAGE_SIZE
    assert held.extents == ((0, 8), (64, 80), (150, 160))
    assert pages_in(held.extents) <= mlocked_pages(held)
    lines = own_mappings_of(path)
    assert [(m.start, m.end) for m in lines] == [(held.addr, held.addr + 192 * PAGE_SIZE)]


def test_repopulates_after_truncate_and_rewrite(locker, mapper, disk_dir):
    path = write_file(disk_dir / "rewrite.bin", 32)
    plan = planned(path, mapper(path), [(0, 32)])
    locker.apply([plan], budget_bytes=1 << 30)
    os.truncate(path, 0)
    write_file(path, 32)
    assert locker.refresh_locked() == 0

    report = locker.apply([plan], budget_bytes=1 << 30)

    assert report.changed == []
    assert mlocked_pages(locker.held[plan.key]) == set(range(32))
    assert locker.held[plan.key].locked_bytes == 32 * PAGE_SIZE


# --- sources that no longer reach the file -------------------------------------------


def test_replaced_file_is_skipped(locker, mapper, disk_dir):
    planned_path = write_file(disk_dir / "planned.bin", 8)
    other_path = write_file(disk_dir / "other.bin", 8)
    # The source process maps another file than the planned key names.
    plan = planned(planned_path, mapper(other_path), [(0, 8)], key=file_key(planned_path))

    report = locker.apply([plan], budget_bytes=1 << 30)

    assert report.skipped == [(plan.key, str(planned_path), REASON_KEY_CHANGED)]
    assert dict(locker.held) == {}
    assert own_mappings_of(other_path) == []


def test_exited_source_is_skipped(locker, map_file_program, disk_dir):
    path = write_file(disk_dir / "gone.bin", 8)
    with procs.spawn([map_file_program, "-n", path], ready_line="ready") as spawned:
        source = (spawned.pid, find_mapping(spawned.pid, path))
    plan = planned(path, source, [(0, 8)])

    report = locker.apply([plan], budget_bytes=1 << 30)

    assert [(key, reason) for key, _, reason in report.skipped] == [(plan.key, "mapping gone")]
    assert dict(locker.held) == {}


# --- limits ---------------------------------------------------------------------------


def test_default_vma_ceiling_is_half_max_map_count():
    assert Locker().max_vmas == read_max_map_count() // 2


def test_vma_limit_skips_new_files(locker, mapper, disk_dir):
    paths = [write_file(disk_dir / f"vma{index}.bin", 4) for index in range(2)]
    plans = [planned(path, mapper(path), [(0, 4)]) for path in paths]
    locker.max_vmas = locker.vma_count() + 1

    report = locker.apply(plans, budget_bytes=1 << 30)

    assert [key for key, _ in report.locked] == [plans[0].key]
    assert report.skipped == [(plans[1].key, str(paths[1]), REASON_VMA_LIMIT)]
    assert own_mappings_of(paths[1]) == []


# Runs the locker with RLIMIT_MEMLOCK at 64 KiB; argv[1] is a JSON list of planned files.
MEMLOCK_CHILD = r"""
import json, os, resource, sys
from prelock import pagemap
from prelock.locker import Locker
from prelock.plan import FileSource, PlannedFile
from prelock.procfs import Mapping

resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 << 10, 64 << 10))
with open("/proc/self/status") as status:
    cap_eff = int(next(line for line in status if line.startswith("CapEff:")).split()[1], 16)

plans = []
for item in json.loads(sys.argv[1]):
    plans.append(PlannedFile(
        key=tuple(item["key"]), path=item["path"], tier="critical", size_bytes=item["size_bytes"],
        extents=tuple(map(tuple, item["extents"])), pages_planned=item["pages"],
        pages_mapped=item["pages"], owners=((item["pid"], "map_file"),),
        sources=(FileSource(item["pid"], Mapping(**item["mapping"])),)))

locker = Locker()
report = locker.apply(plans, budget_bytes=1 << 30)
held = {}
for key, record in locker.held.items():
    raw = pagemap.read_pagemap("self", record.addr, record.addr + record.length_bytes)
    pfns = [pfn for pfn in pagemap.pfns(raw) if pfn]
    flags = pagemap.read_kpageflags(pfns)
    held[record.path] = {"locked_bytes": record.locked_bytes,
                         "mlocked_pages": sum(pagemap.is_mlocked(flags[pfn]) for pfn in pfns)}
print(json.dumps({"cap_eff": cap_eff, "memlock_limited": report.memlock_limited,
                  "skipped": [[path, reason] for _, path, reason in report.skipped], "held": held}))
"""


def test_memlock_limit_stops_locking(mapper, disk_dir):
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop CAP_IPC_LOCK"
    # The limit counts the whole length of each lock-on-fault mapping: 16 + 16 KiB fit
    # in 64 KiB, the 64 KiB file then does not, and the locker stops there.
    sizes = {"a.bin": 4, "b.bin": 4, "c.bin": 16, "d.bin": 2}
    items = []
    for name, pages in sizes.items():
        path = write_file(disk_dir / name, pages)
        pid, mapping = mapper(path)
        items.append({"key": file_key(path), "path": str(path), "size_bytes": pages * PAGE_SIZE,
                      "extents": [[0, pages]], "pages": pages, "pid": pid,
                      "mapping": {field: getattr(mapping, field) for field in mapping.__slots__}})

    done = subprocess.run(
        [setpriv, "--bounding-set", "-ipc_lock", "--inh-caps", "-ipc_lock",
         sys.executable, "-c", MEMLOCK_CHILD, json.dumps(items)],
        capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert not result["cap_eff"] >> CAP_IPC_LOCK & 1, "the child still has CAP_IPC_LOCK"
    assert result["memlock_limited"]
    paths = {name: str(disk_dir / name) for name in sizes}
    assert result["skipped"] == [[paths["c.bin"], REASON_MEMLOCK], [paths["d.bin"], REASON_MEMLOCK]]
    assert sorted(result["held"]) == [paths["a.bin"], paths["b.bin"]]
    for name in ("a.bin", "b.bin"):
        assert result["held"][paths[name]] == {"locked_bytes": 4 * PAGE_SIZE, "mlocked_pages": 4}, name
