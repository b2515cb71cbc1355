"""Tests of prelock.procfs and prelock.pagemap against the live /proc of this machine.

The sweeps only read /proc. Every other test asserts only about this test process and
processes it starts.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import privdrop
import procs
from prelock import files, native, pagemap, procfs
from prelock.errors import AccessDenied, ProcessGone

pytestmark = pytest.mark.root

PAGE_SIZE = native.PAGE_SIZE
EXPECTED_ERRORS = (ProcessGone, AccessDenied)
OTHER_READERS = (procfs.read_status, procfs.read_cgroup, procfs.read_comm, procfs.read_exe)

# The main thread calls pthread_exit while a second thread lives on. The second thread
# prints "ready" once the main thread's task reads state Z, then sleeps until a signal.
MAIN_THREAD_EXIT_PROGRAM = """
import ctypes, threading, time

main_tid = threading.get_native_id()

def wait_then_sleep():
    while True:
        with open(f"/proc/self/task/{main_tid}/stat", "rb") as stat_file:
            if stat_file.read().rpartition(b")")[2].split()[0] == b"Z":
                break
        time.sleep(0.01)
    print("ready", flush=True)
    while True:
        time.sleep(3600)

threading.Thread(target=wait_then_sleep).start()
ctypes.CDLL(None).pthread_exit(None)
"""


# --- sweep over every PID ---------------------------------------------------------

def check_maps(pid: int, violations: dict[str, list[str]]) -> int:
    """Read the maps of pid, record broken invariants and return the number of mappings."""
    try:
        mappings = procfs.read_maps(pid)
    except EXPECTED_ERRORS:
        return 0
    except Exception as exc:  # the sweep reports anything else instead of stopping
        violations["unexpected"].append(f"read_maps({pid}): {exc!r}")
        return 0

    for mapping in mappings:
        line = f"{pid}: {mapping}"
        if not mapping.start < mapping.end:
            violations["range"].append(line)
        if len(mapping.perms) != 4:
            violations["perms_length"].append(line)
        elif not (mapping.perms[0] in "r-" and mapping.perms[1] in "w-"
                  and mapping.perms[2] in "x-" and mapping.perms[3] in "ps"):
            violations["perms_letters"].append(line)
        if mapping.start % PAGE_SIZE or mapping.end % PAGE_SIZE:
            violations["alignment"].append(line)
    return len(mappings)


def check_stat(pid: int, violations: dict[str, list[str]]) -> None:
    try:
        stat = procfs.read_stat(pid)
    except EXPECTED_ERRORS:
        return
    except Exception as exc:  # the sweep reports anything else instead of stopping
        violations["unexpected"].append(f"read_stat({pid}): {exc!r}")
        return
    if stat.pid != pid:
        violations["stat_pid"].append(f"{pid}: stat reads pid {stat.pid}")


def check_other_readers(pid: int, violations: dict[str, list[str]]) -> None:
    for reader in OTHER_READERS:
        try:
            reader(pid)
        except EXPECTED_ERRORS:
            pass
        except Exception as exc:  # the sweep reports anything else instead of stopping
            violations["unexpected"].append(f"{reader.__name__}({pid}): {exc!r}")


def sweep_all_pids() -> dict:
    """Read every PID in /proc with every reader and return the broken invariants.

    Also returns how many mappings read_maps found for the calling process.
    """
    violations: dict[str, list[str]] = {
        "range": [], "perms_length": [], "perms_letters": [], "alignment": [],
        "stat_pid": [], "unexpected": [],
    }
    mapping_counts = {}
    for pid in procfs.list_pids():
        mapping_counts[pid] = check_maps(pid, violations)
        check_stat(pid, violations)
        check_other_readers(pid, violations)
    return {"violations": violations, "own_mappings": mapping_counts.get(os.getpid(), 0)}


def assert_no_violations(violations: dict[str, list[str]]) -> None:
    assert violations["range"] == [], "mappings with start >= end"
    assert violations["perms_length"] == [], "perms not 4 characters"
    assert violations["perms_letters"] == [], "perms letters out of place"
    assert violations["alignment"] == [], "mapping bounds not page-aligned"
    assert violations["stat_pid"] == [], "stat pid differs from the directory"
    assert violations["unexpected"] == [], "errors other than ProcessGone and AccessDenied"


def test_sweep_as_root():
    result = sweep_all_pids()
    assert_no_violations(result["violations"])
    assert result["own_mappings"] > 0


def test_sweep_as_nobody():
    with procs.spawn(["sleep", "3600"]) as root_child:
        def sweep_and_read_child() -> dict:
            result = sweep_all_pids()
            try:
                procfs.read_maps(root_child.pid)
                result["root_child_maps"] = "read"
            except AccessDenied as exc:
                result["root_child_maps"] = type(exc).__name__
            result["root_child_stat_pid"] = procfs.read_stat(root_child.pid).pid
            return result

        result = privdrop.call_as_nobody(sweep_and_read_child)

    assert_no_violations(result["violations"])
    assert result["own_mappings"] > 0
    assert result["root_child_maps"] == "AccessDenied"
    assert result["root_child_stat_pid"] == root_child.pid


# --- processes started here -------------------------------------------------------

def test_zombie_reads_empty():
    with procs.spawn(["true"]) as child:
        # WNOWAIT leaves the exited child unreaped, so it stays a zombie until teardown.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert procfs.read_stat(child.pid).state == "Z"
        assert procfs.read_maps(child.pid) == []
        assert procfs.read_exe(child.pid) is None


# Arguments that need care: an absolute argv[0], "--" and arguments with spaces. The
# program prints "ready" and waits for a signal, so it is alive while the test reads it.
CMDLINE_ARGV = [sys.executable, "-c", "import signal; print('ready', flush=True); signal.pause()",
                "--", "an argument with spaces"]


def test_read_cmdline_live_process():
    with procs.spawn(CMDLINE_ARGV, ready_line="ready") as child:
        assert procfs.read_cmdline(child.pid) == CMDLINE_ARGV


def test_read_cmdline_zombie_is_empty():
    with procs.spawn(CMDLINE_ARGV, ready_line="ready") as child:
        os.kill(child.pid, signal.SIGKILL)
        # WNOWAIT leaves the killed child unreaped, so it stays a zombie until teardown.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert procfs.read_stat(child.pid).state == "Z"

        # A zombie has no memory map left to read its arguments from.
        assert procfs.read_cmdline(child.pid) == []


def test_main_thread_exited_maps():
    with procs.spawn([sys.executable, "-c", MAIN_THREAD_EXIT_PROGRAM], ready_line="ready") as child:
        assert Path(f"/proc/{child.pid}/maps").read_bytes() == b""
        paths = {mapping.path for mapping in procfs.read_maps(child.pid)}
        assert os.path.realpath(sys.executable) in paths


def test_main_thread_exited_stat_reads_zombie():
    # The thread group leader's stat reads Z although the process runs: state Z alone
    # does not tell a zombie from a process whose main thread exited.
    with procs.spawn([sys.executable, "-c", MAIN_THREAD_EXIT_PROGRAM], ready_line="ready") as child:
        assert procfs.read_stat(child.pid).state == "Z"
        assert procfs.read_status(child.pid)["Threads"] == "2"


def test_main_thread_exited_exe():
    with procs.spawn([sys.executable, "-c", MAIN_THREAD_EXIT_PROGRAM], ready_line="ready") as child:
        assert procfs.read_exe(child.pid) == os.path.realpath(sys.executable)


READERS = [
    pytest.param(procfs.read_maps, id="maps"),
    pytest.param(procfs.read_stat, id="stat"),
    pytest.param(procfs.read_status, id="status"),
    pytest.param(procfs.read_cgroup, id="cgroup"),
    pytest.param(procfs.read_comm, id="comm"),
    pytest.param(procfs.read_exe, id="exe"),
]


@pytest.mark.parametrize("reader", READERS)
def test_reader_after_exit(reader: Callable[[int], object]):
    with procs.spawn(["sleep", "3600"]) as child:
        assert child.pid in procfs.list_pids()
    # spawn ended and reaped the child, so its /proc directory is gone.
    with pytest.raises(ProcessGone) as caught:
        reader(child.pid)
    assert caught.value.pid == child.pid


def own_maps_text_route() -> list[procfs.Mapping]:
    with open("/proc/self/maps", "rb") as maps_file:
        return procfs.parse_maps(maps_file.read())


def own_maps_read_maps() -> list[procfs.Mapping]:
    return procfs.read_maps(os.getpid())


# read_maps uses PROCMAP_QUERY on Linux 6.11+ and parses the maps text on older kernels.
# The text route is also tested on its own, so both routes are covered on any kernel.
NAME_CASES = [
    pytest.param(b"with space", id="space"),
    pytest.param(b"x (deleted)", id="named-deleted"),
    pytest.param(b"new\nline", id="newline"),
    pytest.param(b"tab\tname", id="tab"),
    pytest.param(b"caf\xe9\xff", id="non-utf8"),
    pytest.param(b"cr\rname", id="carriage-return"),
]
ROUTES = [
    pytest.param(own_maps_read_maps, id="read_maps"),
    pytest.param(own_maps_text_route, id="text"),
]


@pytest.mark.parametrize("read_own_maps", ROUTES)
@pytest.mark.parametrize("name", NAME_CASES)
def test_maps_hostile_name(tmp_path: Path, name: bytes, read_own_maps: Callable[[], list[procfs.Mapping]]):
    path = os.fsencode(tmp_path) + b"/" + name
    with open(path, "wb") as data_file:
        data_file.write(b"\x01" * PAGE_SIZE)
    with open(path, "rb") as data_file, \
            mmap.mmap(data_file.fileno(), PAGE_SIZE, access=mmap.ACCESS_READ):
        inode = os.fstat(data_file.fileno()).st_ino
        matches = [m for m in read_own_maps() if m.inode == inode]
        assert len(matches) == 1
        assert os.fsencode(matches[0].path) == path


def open_deep_file(top: Path, depth: int) -> tuple[bytes, int]:
    """Create a file below `depth` directories of 250-byte names and open it read-only.

    Returns the file's path and descriptor. The path is longer than PATH_MAX (4096
    bytes), so every step goes through dir_fd.
    """
    component = "d" * 250
    dir_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(component, dir_fd=dir_fd)
            next_fd = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = next_fd
        write_fd = os.open("data.bin", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dir_fd)
        os.write(write_fd, b"\x01" * PAGE_SIZE)
        os.close(write_fd)
        file_fd = os.open("data.bin", os.O_RDONLY, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return b"/".join([os.fsencode(top), *[component.encode()] * depth, b"data.bin"]), file_fd


@pytest.mark.parametrize("read_own_maps", [
    pytest.param(own_maps_read_maps, id="read_maps"),
    pytest.param(own_maps_text_route, id="text"),
])
def test_maps_path_longer_than_path_max(tmp_path: Path,
                                        read_own_maps: Callable[[], list[procfs.Mapping]]):
    path, file_fd = open_deep_file(tmp_path, depth=18)
    try:
        inode = os.fstat(file_fd).st_ino
        with mmap.mmap(file_fd, PAGE_SIZE, access=mmap.ACCESS_READ):
            matches = [m for m in read_own_maps() if m.inode == inode]
    finally:
        os.close(file_fd)

    assert len(path) > 4096
    assert len(matches) == 1
    assert os.fsencode(matches[0].path) == path


# Prints "ready" and waits for a signal, so its mappings stay the same while read twice.
IDLE_PROGRAM = "import signal; print('ready', flush=True); signal.pause()"


def test_query_and_text_agree():
    if not native.has_procmap_query():
        pytest.skip("no PROCMAP_QUERY ioctl on /proc/PID/maps (Linux 6.11+)")

    with procs.spawn([sys.executable, "-c", IDLE_PROGRAM], ready_line="ready") as child:
        maps_path = f"/proc/{child.pid}/maps"
        with open(maps_path, "rb") as maps_file:
            text = procfs.parse_maps(maps_file.read())
        fd = os.open(maps_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            queried = procfs.query_maps(fd, maps_path)
        finally:
            os.close(fd)

    # [vsyscall] is a fixed page outside the process's VMA tree, which PROCMAP_QUERY walks.
    assert queried == [m for m in text if m.path != "[vsyscall]"]
    assert len(queried) > 0


# --- pagemap of this process ------------------------------------------------------

FILE_PAGES = 16
TOUCHED_PAGES = (0, 5, 9)


@pytest.fixture
def cold_file(disk_dir: Path) -> Iterator[int]:
    """An fd of a 16-page file on disk with none of its pages in the page cache."""
    path = disk_dir / "pages.bin"
    with open(path, "wb") as data_file:
        data_file.write(os.urandom(FILE_PAGES * PAGE_SIZE))
        data_file.flush()
        os.fsync(data_file.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        # POSIX_FADV_DONTNEED drops clean pages that nothing maps from the page cache at once.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        yield fd
    finally:
        os.close(fd)


def own_mapping(fd: int) -> procfs.Mapping:
    key = files.file_key(os.fstat(fd))
    matches = [m for m in procfs.read_maps(os.getpid()) if (m.dev, m.inode) == key]
    assert len(matches) == 1, f"expected one mapping of file key {key}, got {matches}"
    return matches[0]


def map_cold(fd: int) -> mmap.mmap:
    mapped = mmap.mmap(fd, FILE_PAGES * PAGE_SIZE, access=mmap.ACCESS_READ)
    # With readahead off, a fault on a cold file reads only its own page into a folio of
    # one page, and fault-around finds no other cached page to map. So exactly the
    # touched pages become present, and locking one page locks no neighbour.
    mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def resident_pages(mapping: procfs.Mapping) -> int:
    return sum(byte & 1 for byte in native.mincore(mapping.start, mapping.size_bytes))


def test_pagemap_present_file_pages(cold_file: int):
    with map_cold(cold_file) as mapped:
        mapping = own_mapping(cold_file)
        assert resident_pages(mapping) == 0, "POSIX_FADV_DONTNEED left pages in the page cache"
        for page in TOUCHED_PAGES:
            mapped[page * PAGE_SIZE]
        raw = pagemap.read_pagemap(os.getpid(), mapping.start, mapping.end)

    flags = pagemap.present_file_pages(raw)
    pfn_list = pagemap.pfns(raw)
    assert len(flags) == FILE_PAGES
    assert pagemap.runs(flags) == [(0, 1), (5, 6), (9, 10)]
    assert [page for page, pfn in enumerate(pfn_list) if pfn] == list(TOUCHED_PAGES)


def test_kpageflags_mlocked(cold_file: int):
    with map_cold(cold_file) as mapped:
        mapping = own_mapping(cold_file)
        mapped[0]
        mapped[5 * PAGE_SIZE]
        native.mlock2(mapping.start, PAGE_SIZE)
        try:
            pfn_list = pagemap.pfns(pagemap.read_pagemap(os.getpid(), mapping.start, mapping.end))
            flags = pagemap.read_kpageflags(pfn_list)
        finally:
            native.munlock(mapping.start, PAGE_SIZE)

    assert pfn_list[0] != 0
    assert pfn_list[5] != 0
    assert pagemap.is_mlocked(flags[pfn_list[0]])
    assert not pagemap.is_mlocked(flags[pfn_list[5]])


def test_pagemap_cow_page_not_file(cold_file: int):
    with mmap.mmap(cold_file, FILE_PAGES * PAGE_SIZE, access=mmap.ACCESS_COPY) as mapped:
        mapping = own_mapping(cold_file)
        # A write to a private file mapping replaces the page with an anonymous copy.
        mapped[2 * PAGE_SIZE] = 0x41
        mapped[3 * PAGE_SIZE]
        raw = pagemap.read_pagemap(os.getpid(), mapping.start, mapping.end)

    flags = pagemap.present_file_pages(raw)
    pfn_list = pagemap.pfns(raw)
    assert flags[2] == 0
    assert pfn_list[2] != 0
    assert flags[3] == 1
    assert pfn_list[3] != 0


def test_pagemap_after_exit_reads_empty():
    with procs.spawn([sys.executable, "-c", IDLE_PROGRAM], ready_line="ready") as child:
        mapping = procfs.read_maps(child.pid)[0]
        fd = pagemap.open_pagemap(child.pid)
    # spawn ended and reaped the child, so the open pagemap now reads as empty.
    try:
        raw = pagemap.read_entries(fd, mapping.start, mapping.end)
    finally:
        os.close(fd)
    assert raw == b""
