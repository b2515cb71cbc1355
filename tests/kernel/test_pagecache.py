"""Page-cache residency on the real kernel: both backends and util-linux fincore agree.

Files are created under /var/tmp, which is disk-backed here: tmpfs pages would never be
evicted, so the eviction cases would prove nothing there.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from prelock import native, pagecache
from prelock.files import FileSkipped

pytestmark = pytest.mark.root

PAGE = native.PAGE_SIZE
FINCORE = "/usr/bin/fincore"
NOBODY = 65534


@pytest.fixture
def workdir():
    """A directory on disk that an unprivileged user may traverse."""
    path = tempfile.mkdtemp(prefix="prelock-pagecache-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def write_file(path: str, data: bytes, sync: bool = True) -> str:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return path


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_range(path: str, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        # POSIX_FADV_RANDOM keeps readahead from caching pages beyond the range.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, length, offset)
    finally:
        os.close(fd)


def make_edge_files(directory: str) -> dict[str, str]:
    """Create the files both backends must count identically; return name -> path."""
    files = {
        "empty": write_file(f"{directory}/empty", b""),
        "one-byte": write_file(f"{directory}/one-byte", b"x"),
        "page-minus-one": write_file(f"{directory}/page-minus-one", b"p" * (PAGE - 1)),
        "dirty": write_file(f"{directory}/dirty", b"d" * (10 * PAGE), sync=False),
        "large": write_file(f"{directory}/large", os.urandom(3 << 20)),
    }

    sparse = f"{directory}/sparse"
    with open(sparse, "wb") as f:
        for page in (0, 20, 63):
            f.seek(page * PAGE)
            f.write(b"s" * PAGE)
        f.flush()
        os.fsync(f.fileno())
    drop_cache(sparse)
    read_range(sparse, 0, PAGE)
    read_range(sparse, 30 * PAGE, PAGE)  # a hole: reading it caches a zero-filled page
    files["sparse"] = sparse

    evicted = write_file(f"{directory}/evicted", os.urandom(32 * PAGE))
    drop_cache(evicted)
    read_range(evicted, 8 * PAGE, 4 * PAGE)
    files["evicted"] = evicted
    return files


def measure(path: str, backend: str) -> pagecache.Residency:
    fd, st = pagecache.open_regular_file(path)
    try:
        return pagecache.measure(fd, st, backend, path)
    finally:
        os.close(fd)


def fincore_pages(paths: list[str]) -> dict[str, tuple[int, int]]:
    """Return path -> (resident pages, size in bytes) as util-linux fincore reports them."""
    output = subprocess.run([FINCORE, "--raw", "--bytes", "--noheadings", "--output", "PAGES,SIZE,FILE", *paths],
                            check=True, capture_output=True, text=True, timeout=60).stdout
    counts = {}
    for line in output.splitlines():
        pages, size_bytes, path = line.split(" ", 2)
        counts[path] = (int(pages), int(size_bytes))
    return counts


@pytest.mark.skipif(not native.has_cachestat(), reason="cachestat(2) needs Linux 6.5+")
def test_backends_agree_on_edge_files(workdir):
    files = make_edge_files(workdir)
    for name, path in files.items():
        by_cachestat = measure(path, "cachestat")
        by_mincore = measure(path, "mincore")
        assert by_cachestat.cached_pages == by_mincore.cached_pages, name
        assert by_cachestat.pages == by_mincore.pages, name
        assert by_cachestat.size_bytes == by_mincore.size_bytes, name


@pytest.mark.parametrize("backend", pagecache.BACKENDS)
def test_counts_equal_fincore(workdir, backend):
    if backend == "cachestat" and not native.has_cachestat():
        pytest.skip("cachestat(2) needs Linux 6.5+")
    files = make_edge_files(workdir)
    reference = fincore_pages(list(files.values()))
    for name, path in files.items():
        residency = measure(path, backend)
        assert (residency.cached_pages, residency.size_bytes) == reference[path], name


@pytest.mark.parametrize("backend", pagecache.BACKENDS)
def test_edge_file_counts(workdir, backend):
    if backend == "cachestat" and not native.has_cachestat():
        pytest.skip("cachestat(2) needs Linux 6.5+")
    files = make_edge_files(workdir)
    expected = {  # name -> (pages, cached pages)
        "empty": (0, 0),
        "one-byte": (1, 1),
        "page-minus-one": (1, 1),
        "dirty": (10, 10),
        "large": (768, 768),
        "sparse": (64, 2),
        "evicted": (32, 4),
    }
    for name, (pages, cached_pages) in expected.items():
        residency = measure(files[name], backend)
        assert residency.pages == pages, name
        assert residency.cached_pages == cached_pages, name


@pytest.mark.skipif(not native.has_cachestat(), reason="cachestat(2) needs Linux 6.5+")
def test_cachestat_dirty_pages(workdir):
    path = write_file(f"{workdir}/unsynced", b"d" * (10 * PAGE), sync=False)
    residency = measure(path, "cachestat")
    # Background writeback starts only after dirty_expire_centisecs (30 s by default), so
    # the pages are dirty or, at most, under writeback.
    assert residency.dirty_pages + residency.writeback_pages == 10
    os.sync()
    assert measure(path, "cachestat").dirty_pages == 0


def test_mincore_has_no_dirty_or_evicted(workdir):
    path = write_file(f"{workdir}/f", b"x" * PAGE, sync=False)
    residency = measure(path, "mincore")
    assert residency.cached_pages == 1
    assert residency.dirty_pages is None
    assert residency.evicted_pages is None
    assert residency.recently_evicted_pages is None


@pytest.mark.parametrize("backend", pagecache.BACKENDS)
def test_truncated_after_fstat_no_sigbus(workdir, backend):
    if backend == "cachestat" and not native.has_cachestat():
        pytest.skip("cachestat(2) needs Linux 6.5+")
    path = write_file(f"{workdir}/shrinks", os.urandom(16 * PAGE))
    fd, st = pagecache.open_regular_file(path)
    try:
        os.truncate(path, 0)
        residency = pagecache.measure(fd, st, backend, path)
    finally:
        os.close(fd)
    assert residency.pages == 16
    assert residency.cached_pages == 0


def test_fifo_and_device_not_opened(workdir):
    fifo = f"{workdir}/fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileSkipped, match=r"not a regular file \(FIFO\)"):
        pagecache.open_regular_file(fifo)
    with pytest.raises(FileSkipped, match=r"not a regular file \(character device\)"):
        pagecache.open_regular_file("/dev/null")
    with pytest.raises(FileSkipped, match=r"not a regular file \(directory\)"):
        pagecache.open_regular_file(workdir)


UNPRIVILEGED_PROBE = """
import json, os, sys
from prelock import native, pagecache
results = {}
for backend in sys.argv[2:]:
    fd, st = pagecache.open_regular_file(sys.argv[1])
    r = pagecache.measure(fd, st, backend, sys.argv[1])
    os.close(fd)
    results[backend] = [r.cached_pages, r.pages, r.unknown_reason]
print(json.dumps(results))
"""


def as_nobody(command: list[str]) -> list[str]:
    """Prefix command to run it as nobody with no capabilities.

    setpriv execs while it still holds capabilities, so the interpreter starts even when
    its path crosses a directory that the nobody user cannot search (such as /root).
    """
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


def measure_as_nobody(path: str) -> dict[str, list]:
    backends = [b for b in pagecache.BACKENDS if b != "cachestat" or native.has_cachestat()]
    result = subprocess.run(as_nobody([sys.executable, "-c", UNPRIVILEGED_PROBE, path, *backends]),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_not_owned_file_is_unknown(workdir):
    path = write_file(f"{workdir}/root-owned", os.urandom(8 * PAGE))
    os.chmod(path, 0o644)
    drop_cache(path)
    results = measure_as_nobody(path)
    assert results
    for backend, (cached_pages, pages, reason) in results.items():
        # mincore would claim 8 of 8 pages here; the file must read as unknown instead.
        assert cached_pages is None, backend
        assert pages == 8, backend
        assert reason.startswith("residency unknown"), backend


def test_owned_file_is_measured(workdir):
    path = write_file(f"{workdir}/nobody-owned", os.urandom(8 * PAGE))
    os.chown(path, NOBODY, NOBODY)
    drop_cache(path)
    read_range(path, 0, 2 * PAGE)
    for backend, (cached_pages, pages, reason) in measure_as_nobody(path).items():
        assert (cached_pages, pages, reason) == (2, 8, None), backend


def test_writable_file_is_measured(workdir):
    path = write_file(f"{workdir}/world-writable", os.urandom(4 * PAGE))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH)
    drop_cache(path)
    for backend, (cached_pages, pages, reason) in measure_as_nobody(path).items():
        assert (cached_pages, pages, reason) == (0, 4, None), backend
