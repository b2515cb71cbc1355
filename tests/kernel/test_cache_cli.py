"""`prelock cache` end to end against real processes that the tests start and end by PID."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

from prelock import cache, cgroupfs, native
from prelock.pagemap import is_mlocked, pfns, present_file_pages, read_kpageflags, read_pagemap
from prelock.procfs import memory_cgroup_path, read_cgroup, read_maps

pytestmark = pytest.mark.root

PAGE = native.PAGE_SIZE
NOBODY = 65534
FINCORE = "/usr/bin/fincore"

# Maps each file argument (shared, read-only), touches every page, optionally mlocks the
# mappings, prints "ready" and sleeps until killed.
MAPPER_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int lock = argc > 1 && strcmp(argv[1], "--lock") == 0;
    volatile char sink = 0;

    for (int i = 1 + lock; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) {
            perror(argv[i]);
            return 1;
        }
        char *p = mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED || (lock && mlock(p, st.st_size) != 0)) {
            perror(argv[i]);
            return 1;
        }
        for (off_t off = 0; off < st.st_size; off += 4096)
            sink += p[off];
        close(fd);
    }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
"""


@pytest.fixture(scope="module")
def mapper() -> Iterator[str]:
    """Compile the mapper program into a disk-backed directory; return its path."""
    directory = tempfile.mkdtemp(prefix="prelock-mapper-", dir="/var/tmp")
    os.chmod(directory, 0o755)
    source = os.path.join(directory, "mapper.c")
    with open(source, "w") as f:
        f.write(MAPPER_SOURCE)
    binary = os.path.join(directory, "mapper")
    subprocess.run(["gcc", "-O1", "-o", binary, source], check=True, timeout=120)
    yield binary
    shutil.rmtree(directory)


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="prelock-cache-cli-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@contextlib.contextmanager
def started(command: list[str]) -> Iterator[subprocess.Popen]:
    """Start command, wait for its "ready" line, and kill it by PID on exit."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line == "ready\n", f"{command} did not start: {line!r}"
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)
        process.stdout.close()


def write_file(path: str, size_bytes: int) -> str:
    with open(path, "wb") as f:
        f.write(os.urandom(size_bytes))
        f.flush()
        os.fsync(f.fileno())
    return path


def as_nobody(command: list[str]) -> list[str]:
    # setpriv execs while it still holds capabilities, so the interpreter starts even when
    # its path crosses a directory that the nobody user cannot search (such as /root).
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def run_cache(*args: str, unprivileged: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from prelock.cli import main; main()", "cache", *args]
    if unprivileged:
        command = as_nobody(command)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cache_json(*args: str, **kwargs) -> dict:
    return json.loads(run_cache(*args, "--json", **kwargs).stdout)


def files_by_path(report: dict) -> dict[str, dict]:
    return {entry["path"]: entry for entry in report["files"]}


def fincore_pages(path: str) -> int:
    output = subprocess.run([FINCORE, "--raw", "--noheadings", "--output", "PAGES", path], check=True,
                            capture_output=True, text=True, timeout=60).stdout
    return int(output.split()[0])


def mlocked_pages(pid: int, path: str) -> int:
    """Count the pages of path that pid maps and /proc/kpageflags reports PG_mlocked."""
    locked_pfns = set()
    for mapping in read_maps(pid):
        if mapping.path != path:
            continue
        raw = read_pagemap(pid, mapping.start, mapping.end)
        present = [pfn for is_file, pfn in zip(present_file_pages(raw), pfns(raw)) if is_file and pfn]
        flags = read_kpageflags(present)
        locked_pfns.update(pfn for pfn in present if is_mlocked(flags[pfn]))
    return len(locked_pfns)


def test_pid_lists_other_namespace_and_deleted(mapper, workdir):
    source = os.path.join(workdir, "src")
    os.mkdir(source)
    shutil.copy(mapper, os.path.join(source, "prog"))
    write_file(os.path.join(source, "data"), 16 * PAGE)
    write_file(os.path.join(source, "gone"), 8 * PAGE)
    mount_point = tempfile.mkdtemp(prefix="prelock-cache-", dir="/mnt")
    script = 'mount --bind "$1" "$2" && exec "$2/prog" "$2/data" "$2/gone"'
    command = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", source, mount_point]
    try:
        with started(command) as process:
            os.unlink(os.path.join(source, "gone"))
            report = cache_json("--pid", str(process.pid))
            # The bind mount exists only in the child's mount namespace.
            assert not os.path.exists(os.path.join(mount_point, "data"))
    finally:
        os.rmdir(mount_point)

    files = files_by_path(report)
    data = files[f"{mount_point}/data"]
    gone = files[f"{mount_point}/gone (deleted)"]
    assert f"{mount_point}/prog" in files
    assert (data["pages"], data["cached_pages"], data["error"]) == (16, 16, None)
    assert data["cached_pages"] == fincore_pages(os.path.join(source, "data"))
    assert (gone["pages"], gone["cached_pages"], gone["error"]) == (8, 8, None)
    assert data["processes"] == [{"pid": process.pid, "comm": "prog"}]
    assert report["scope"]["processes"] == 1


def test_pid_lists_every_file_in_maps(mapper, workdir):
    data = write_file(os.path.join(workdir, "data"), 4 * PAGE)
    with started([mapper, data]) as process:
        mapped = {m.path for m in read_maps(process.pid) if m.file_backed}
        report = cache_json("--pid", str(process.pid))
    assert mapped
    assert set(files_by_path(report)) == mapped


def write_file_by_pages(path: str, pages: int) -> str:
    """Write path one page per write() so that its page cache uses 4 KiB folios."""
    with open(path, "wb", buffering=0) as f:
        for _ in range(pages):
            f.write(os.urandom(PAGE))
        os.fsync(f.fileno())
    return path


def test_locked_matches_kpageflags(mapper, workdir):
    locked_file = write_file_by_pages(os.path.join(workdir, "locked"), 64)
    plain_file = write_file_by_pages(os.path.join(workdir, "plain"), 64)
    with started([mapper, "--lock", locked_file]) as locker, started([mapper, plain_file]) as reader:
        expected = mlocked_pages(locker.pid, locked_file)
        by_pid = files_by_path(cache_json("--pid", str(locker.pid)))
        by_path = files_by_path(cache_json(locked_file, plain_file))
        plain = files_by_path(cache_json("--pid", str(reader.pid)))[plain_file]

    assert expected == 64
    assert by_pid[locked_file]["locked_pages"] == expected
    assert by_path[locked_file]["locked_pages"] == expected
    assert by_path[locked_file]["processes"] == [{"pid": locker.pid, "comm": "mapper"}]
    assert by_path[plain_file]["locked_pages"] == 0
    assert plain["locked_pages"] == 0


def test_locked_large_folio_matches_kpageflags(mapper, workdir):
    # One 256 KiB write() caches the file in one large folio. mlock() then faults it in
    # 16-page fault-around pieces, and on Linux 6.18 the folio stays without PG_mlocked.
    # Whatever the kernel does, Locked must report what kpageflags reports.
    locked_file = write_file(os.path.join(workdir, "locked-large"), 64 * PAGE)
    with started([mapper, "--lock", locked_file]) as locker:
        expected = mlocked_pages(locker.pid, locked_file)
        entry = files_by_path(cache_json("--pid", str(locker.pid)))[locked_file]
    assert entry["locked_pages"] == expected
    assert entry["cached_pages"] == 64


def test_top_dedupes_by_file_key(mapper, workdir):
    shared = write_file(os.path.join(workdir, "shared"), 8 * PAGE)
    with started([mapper, shared]) as first, started([mapper, shared]) as second:
        everything = cache_json("--top", "1000000")
        one = cache_json("--top", "1")

    entries = [entry for entry in everything["files"] if entry["path"] == shared]
    assert len(entries) == 1
    pids = {process["pid"] for process in entries[0]["processes"]}
    assert {first.pid, second.pid} <= pids
    cached = [entry["cached_pages"] for entry in everything["files"] if entry["cached_pages"] is not None]
    assert cached == sorted(cached, reverse=True)
    assert len(one["files"]) == 1
    assert one["scope"]["listed_files"] == 1
    assert one["scope"]["meminfo_cached_bytes"] > 0


def test_cgroup_selects_its_processes(mapper, workdir):
    controller = cgroupfs.memory_controller()
    if controller is None:
        pytest.skip("no memory cgroup controller is mounted")
    parent = memory_cgroup_path(read_cgroup(os.getpid()))
    name = f"prelock-cache-test-{os.getpid()}"
    data = write_file(os.path.join(workdir, "data"), 4 * PAGE)

    with cgroupfs.memory_cgroup(controller, parent, name, 1 << 30) as cgroup_path:
        with started([mapper, data]) as inside, started([mapper, data]) as outside:
            cgroupfs.add_process(controller, cgroup_path, inside.pid)
            report = cache_json("--cgroup", f"/{name}$")

    assert report["scope"]["processes"] == 1
    pids = {process["pid"] for entry in report["files"] for process in entry["processes"]}
    assert pids == {inside.pid}
    assert outside.pid not in pids
    assert files_by_path(report)[data]["cached_pages"] == 4


def test_exited_process_skipped(mapper, workdir):
    dead = subprocess.Popen(["true"])
    dead.wait()
    data = write_file(os.path.join(workdir, "data"), PAGE)
    with started([mapper, data]) as live:
        scan = cache.scan_processes([dead.pid, live.pid])
    assert scan.skipped["exited"] == 1
    assert list(scan.comms) == [live.pid]

    # The mapper has exited since the scan, so its files are skipped, not listed as errors.
    key = (os.stat(data).st_dev, os.stat(data).st_ino)
    assert cache.measure_mapped(key, scan.mappings_by_key[key], scan.comms, "mincore") is None

    result = run_cache("--pid", str(dead.pid), check=False)
    assert result.returncode == 2
    assert f"process {dead.pid} not found" in result.stderr


def test_paths_match_fincore(workdir):
    paths = [write_file(os.path.join(workdir, f"f{n}"), size) for n, size in
             enumerate([0, 1, PAGE - 1, PAGE, 5 * PAGE + 3, 300 * PAGE])]
    fd = os.open(paths[-1], os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    os.pread(fd, 10 * PAGE, 100 * PAGE)
    os.close(fd)

    for backend in ("cachestat", "mincore"):
        if backend == "cachestat" and not native.has_cachestat():
            continue
        rows = run_cache("--terse", "--nohdr", "--backend", backend, *paths).stdout.splitlines()
        assert len(rows) == len(paths)
        for path, row in zip(paths, rows):
            fields = row.split(",")
            assert fields[0] == path
            assert int(fields[3]) == fincore_pages(path), (backend, path)


def test_fifo_and_directory_listed_with_reason(workdir):
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    data = write_file(os.path.join(workdir, "data"), PAGE)
    os.mkdir(os.path.join(workdir, "sub"))
    nested = write_file(os.path.join(workdir, "sub", "nested"), 2 * PAGE)
    os.symlink(data, os.path.join(workdir, "sub", "link"))

    text = run_cache(fifo, data, workdir).stdout
    assert "1 file not measured (not a regular file (FIFO)): " + fifo in text
    assert "(is a directory; use -r to list the files in it): " + workdir in text

    recursive = files_by_path(cache_json("-r", workdir))
    assert set(recursive) == {data, nested}
    assert recursive[nested]["pages"] == 2


def unmeasurable_paths(workdir: str) -> list[str]:
    """Create a FIFO, a socket, a symlink loop and a directory; return them with /dev/null and a missing path."""
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    sock_path = os.path.join(workdir, "sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(sock_path)
    loop = os.path.join(workdir, "loop")
    os.symlink(loop + "2", loop)
    os.symlink(loop, loop + "2")
    directory = os.path.join(workdir, "dir")
    os.mkdir(directory)
    return [os.path.join(workdir, "nope"), fifo, sock_path, "/dev/null", directory, loop]


def test_no_path_measured_exits_1(workdir):
    for path in unmeasurable_paths(workdir):
        result = run_cache(path, check=False)
        assert result.returncode == 1, (path, result.stderr)
        assert "1 file not measured (" in result.stdout
        assert "the listed file could not be measured" in result.stderr
        assert "Traceback" not in result.stderr


def test_some_paths_measured_exits_0(workdir):
    paths = unmeasurable_paths(workdir)
    data = write_file(os.path.join(workdir, "data"), PAGE)

    result = run_cache("--json", *paths, data, check=False)

    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)["files"]
    assert [entry["path"] for entry in files if entry["cached_pages"] is not None] == [data]
    assert len(files) == len(paths) + 1


def test_interval_too_large_is_usage_error(workdir):
    data = write_file(os.path.join(workdir, "data"), PAGE)

    result = run_cache(data, "1e308", "2", check=False)

    assert result.returncode == 2, result.stderr
    assert "expected an interval in seconds above 0 and at most 86400, got '1e308'" in result.stderr
    assert "Traceback" not in result.stderr


def test_zombie_pid_exits_1():
    child = subprocess.Popen(["true"])
    try:
        # The child stays a zombie until wait() reaps it.
        while read_state(child.pid) != "Z":
            os.sched_yield()
        result = run_cache("--pid", str(child.pid), check=False)
    finally:
        child.wait()

    assert result.returncode == 1, result.stderr
    assert f"process {child.pid} is a zombie" in result.stderr
    assert result.stdout == ""


def read_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()[0].decode()


def test_json_recovers_hostile_name(workdir):
    raw_path = os.fsencode(workdir) + b"/caf\xe9\nlib.so"
    with open(raw_path, "wb") as f:
        f.write(os.urandom(PAGE))

    (entry,) = cache_json(os.fsdecode(raw_path))["files"]
    table = run_cache(os.fsdecode(raw_path)).stdout

    assert bytes.fromhex(entry["path_bytes_hex"]) == raw_path
    assert entry["path"] == os.fsdecode(raw_path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    assert entry["pages"] == 1
    assert "caf\\xe9\\nlib.so" in table
    assert len(table.splitlines()) == 4  # scope, header, the file, Sum


def test_unprivileged_unknown_not_100_percent(workdir):
    path = write_file(os.path.join(workdir, "root-owned"), 8 * PAGE)
    os.chmod(path, 0o644)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)

    for backend in ("cachestat", "mincore"):
        if backend == "cachestat" and not native.has_cachestat():
            continue
        # Nothing could be measured, so the exit code is 1.
        result = run_cache("--json", "--backend", backend, path, unprivileged=True, check=False)
        assert result.returncode == 1, result.stderr
        entry = json.loads(result.stdout)["files"][0]
        assert entry["cached_pages"] is None, backend
        assert entry["percent"] is None, backend
        assert entry["locked_pages"] is None, backend
        assert entry["error"].startswith("residency unknown"), backend

        table = run_cache("--backend", backend, path, unprivileged=True, check=False).stdout
        row = next(line for line in table.splitlines() if line.startswith(path))
        assert row.split()[1:5] == [str(8 * PAGE), "8", "?", "?"]


def test_repeat_prints_json_lines(workdir):
    path = write_file(os.path.join(workdir, "data"), PAGE)
    lines = run_cache(path, "0.1", "2", "--json").stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert json.loads(line)["files"][0]["path"] == path


def test_backend_mincore_forced(workdir):
    path = write_file(os.path.join(workdir, "data"), 3 * PAGE)
    report = cache_json("--backend", "mincore", path)
    entry = report["files"][0]
    assert report["backend"] == "mincore"
    assert report["page_size"] == PAGE
    assert (entry["cached_pages"], entry["dirty_pages"], entry["evicted_pages"]) == (3, None, None)


def test_unprivileged_pid_of_root_exits_3(mapper, workdir):
    data = write_file(os.path.join(workdir, "data"), PAGE)
    with started([mapper, data]) as process:
        result = run_cache("--pid", str(process.pid), unprivileged=True, check=False)
    assert result.returncode == 3, result.stderr
    assert f"access denied to the maps of PID {process.pid}" in result.stderr
