"""Tests of the /proc parsers and readers on literal bytes and on a fixture procfs tree."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import privdrop
from prelock import files, procfs
from prelock.errors import AccessDenied, ProcessGone, translate_proc_error

FIXTURE_PROC = Path(__file__).resolve().parent.parent / "fixtures" / "proc"

# The fields before the path of a file mapping, padded to column 73 as the kernel pads
# them on 64-bit.
FILE_HEAD = b"7f3a2a80b000-7f3a2a960000 r-xp 00026000 103:02 2099021".ljust(73)
SPECIAL_HEAD = b"7ffd4c3f4000-7ffd4c3f6000 r-xp 00000000 00:00 0".ljust(73)


def parse_one(line: bytes) -> procfs.Mapping:
    mappings = procfs.parse_maps(line + b"\n")
    assert len(mappings) == 1, f"expected one mapping from {line!r}, got {mappings}"
    return mappings[0]


# --- maps -------------------------------------------------------------------------

PATH_CASES = [
    pytest.param(b"/opt/my app/lib x.so", "/opt/my app/lib x.so", id="spaces"),
    pytest.param(b"/opt/a  b", "/opt/a  b", id="two-spaces"),
    pytest.param(b"/opt/ends in space ", "/opt/ends in space ", id="trailing-space"),
    pytest.param(b"/opt/a\tb", "/opt/a\tb", id="tab"),
    pytest.param(b"/opt/a\\012b", "/opt/a\nb", id="escaped-newline"),
    pytest.param(b"/opt/x (deleted)", "/opt/x (deleted)", id="deleted-suffix-kept"),
    pytest.param(b"/memfd:foo (deleted)", "/memfd:foo (deleted)", id="memfd"),
    pytest.param(b"/dev/zero (deleted)", "/dev/zero (deleted)", id="dev-zero"),
    pytest.param(b"/SYSV00000000 (deleted)", "/SYSV00000000 (deleted)", id="sysv-shm"),
    # The kernel escapes only a newline in a path, so a file name holding a carriage
    # return appears raw in maps.
    pytest.param(b"/opt/a\rb", "/opt/a\rb", id="carriage-return"),
]


@pytest.mark.parametrize(("raw_path", "expected_path"), PATH_CASES)
def test_maps_path(raw_path: bytes, expected_path: str):
    mapping = parse_one(FILE_HEAD + raw_path)
    assert mapping.path == expected_path
    assert mapping.inode == 2099021


def test_maps_path_non_utf8_round_trip():
    raw_path = b"/opt/caf\xe9/lib\xff\xfe.so"
    mapping = parse_one(FILE_HEAD + raw_path)
    assert isinstance(mapping.path, str)
    assert os.fsencode(mapping.path) == raw_path


@pytest.mark.parametrize("name", ["[vdso]", "[stack]", "[heap]", "[vvar]", "[vsyscall]"])
def test_maps_special_name(name: str):
    mapping = parse_one(SPECIAL_HEAD + name.encode())
    assert mapping.path == name
    assert mapping.inode == 0
    assert not mapping.file_backed


@pytest.mark.parametrize("line", [
    pytest.param(b"0a2b7000-0a2f9000 rw-p 00000000 00:00 0 ", id="trailing-space"),
    pytest.param(b"0a2b7000-0a2f9000 rw-p 00000000 00:00 0", id="no-trailing-space"),
])
def test_maps_anonymous_five_fields(line: bytes):
    mapping = parse_one(line)
    assert mapping.path == ""
    assert mapping.start == 0x0A2B7000
    assert mapping.end == 0x0A2F9000
    assert not mapping.file_backed


def test_maps_64bit_range():
    mapping = parse_one(b"ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0"
                        b"                  [vsyscall]")
    assert mapping.start == 0xFFFFFFFFFF600000
    assert mapping.end == 0xFFFFFFFFFF601000
    assert mapping.size_bytes == 4096
    assert mapping.perms == "--xp"


def test_maps_map_files_name_without_leading_zeros():
    mapping = parse_one(b"00400000-04f5e000 r-xp 00000000 fd:01 1835123".ljust(73)
                        + b"/usr/local/bin/kubelet")
    assert mapping.map_files_name == "400000-4f5e000"


def test_maps_offset_is_hex():
    mapping = parse_one(b"04f5e000-0a1c2000 r--p 04b5e000 fd:01 1835123".ljust(73)
                        + b"/usr/local/bin/kubelet")
    assert mapping.offset == 0x04B5E000


def test_maps_inode_is_decimal():
    mapping = parse_one(FILE_HEAD + b"/usr/lib/libc.so.6")
    assert mapping.inode == 2099021


@pytest.mark.parametrize(("dev_text", "major", "minor"), [
    pytest.param(b"fd:01", 0xFD, 0x01, id="fd:01"),
    pytest.param(b"103:02", 0x103, 0x02, id="103:02"),
    pytest.param(b"00:1e", 0x00, 0x1E, id="00:1e"),
])
def test_maps_dev_is_hex(dev_text: bytes, major: int, minor: int):
    line = b"7f3a2a80b000-7f3a2a960000 r-xp 00026000 " + dev_text + b" 2099021"
    mapping = parse_one(line.ljust(73) + b"/usr/lib/libc.so.6")
    assert mapping.dev_major == major
    assert mapping.dev_minor == minor
    assert mapping.dev == os.makedev(major, minor)


def test_maps_perms_private_code():
    mapping = parse_one(FILE_HEAD + b"/usr/lib/libc.so.6")
    assert mapping.readable
    assert not mapping.writable
    assert mapping.executable
    assert not mapping.shared


def test_maps_perms_shared_writable():
    mapping = parse_one(b"7f3a2aa00000-7f3a2aa04000 rw-s 00000000 00:01 4118".ljust(73)
                        + b"/memfd:ring (deleted)")
    assert mapping.writable
    assert mapping.shared
    assert not mapping.executable


def test_maps_empty_input():
    assert procfs.parse_maps(b"") == []


def test_maps_fixture_file():
    mappings = procfs.parse_maps((FIXTURE_PROC / "100" / "maps").read_bytes())
    paths = [mapping.path for mapping in mappings]
    assert len(mappings) == 14
    assert paths.count("/usr/local/bin/kubelet") == 3
    assert paths.count("/usr/lib/x86_64-linux-gnu/libc.so.6") == 4
    assert paths.count("") == 2
    assert all(mapping.start < mapping.end for mapping in mappings)


SKIP_CASES = [
    pytest.param(FILE_HEAD + b"/memfd:foo (deleted)", "in-memory or device file", id="memfd"),
    pytest.param(FILE_HEAD + b"/dev/zero (deleted)", "in-memory or device file", id="dev-zero"),
    pytest.param(FILE_HEAD + b"/dev/shm/sem.x", "in-memory or device file", id="dev-shm"),
    pytest.param(SPECIAL_HEAD + b"[vdso]", "not a file mapping", id="vdso"),
    pytest.param(SPECIAL_HEAD + b"[stack]", "not a file mapping", id="stack"),
    pytest.param(b"0a2b7000-0a2f9000 rw-p 00000000 00:00 0 ", "not a file mapping", id="anonymous"),
    pytest.param(FILE_HEAD + b"/usr/lib/libc.so.6", None, id="library"),
    pytest.param(FILE_HEAD + b"/opt/x (deleted)", None, id="deleted-or-named-so"),
]


@pytest.mark.parametrize(("line", "reason"), SKIP_CASES)
def test_maps_line_skip_reason(line: bytes, reason: str | None):
    assert files.path_skip_reason(parse_one(line)) == reason


# --- stat -------------------------------------------------------------------------

# Every numeric field contains its own field number from proc_pid_stat(5), so a field read
# from the wrong position shows up as the wrong number.
NUMBERED_STAT = (b"1 (numbered) S " + b" ".join(str(n).encode() for n in range(4, 53)) + b"\n")


def stat_line(pid: bytes, comm: bytes, state: bytes = b"S") -> bytes:
    tail = b" 1 100 100 0 -1 1077936384 52319 0 312 0 8840 2711 0 0 20 0 23 0 1843 2153439232 27354"
    return pid + b" (" + comm + b") " + state + tail + b" 18446744073709551615" + b" 0" * 27 + b"\n"


def test_stat_fields_by_position():
    stat = procfs.parse_stat(NUMBERED_STAT)
    assert stat.pid == 1
    assert stat.state == "S"
    assert stat.ppid == 4
    assert stat.minflt == 10
    assert stat.majflt == 12
    assert stat.starttime_ticks == 22
    assert stat.rss_pages == 24


@pytest.mark.parametrize(("comm", "expected"), [
    pytest.param(b"a) b (c", "a) b (c", id="paren-and-spaces"),
    pytest.param(b"x) R 7 (", "x) R 7 (", id="fake-fields"),
    pytest.param(b"a (b", "a (b", id="open-paren"),
    pytest.param(b"a\nb", "a\nb", id="newline"),
    pytest.param(b"", "", id="empty"),
])
def test_stat_hostile_comm(comm: bytes, expected: str):
    stat = procfs.parse_stat(stat_line(b"4242", comm))
    assert stat.comm == expected
    assert stat.pid == 4242
    assert stat.state == "S"
    assert stat.ppid == 1
    assert stat.majflt == 312
    assert stat.rss_pages == 27354


def test_stat_comm_non_utf8_round_trip():
    stat = procfs.parse_stat(stat_line(b"4242", b"caf\xe9\xff"))
    assert os.fsencode(stat.comm) == b"caf\xe9\xff"


def test_stat_zombie():
    stat = procfs.parse_stat(stat_line(b"4242", b"sh", state=b"Z"))
    assert stat.state == "Z"


def test_stat_fixture_file():
    stat = procfs.parse_stat((FIXTURE_PROC / "100" / "stat").read_bytes())
    assert stat.pid == 100
    assert stat.comm == "kubelet"
    assert stat.ppid == 1
    assert stat.minflt == 52319
    assert stat.majflt == 312
    assert stat.starttime_ticks == 1843
    assert stat.rss_pages == 27354


# --- status -----------------------------------------------------------------------

def test_status_fixture_file():
    status = procfs.parse_status((FIXTURE_PROC / "100" / "status").read_bytes())
    assert status["Name"] == "kubelet"
    assert status["State"] == "S (sleeping)"
    assert status["Uid"] == "0\t0\t0\t0"
    assert status["VmRSS"] == "109416 kB"
    assert status["Threads"] == "23"


def test_status_name_with_colon():
    status = procfs.parse_status(b"Name:\tkworker/0:1H\nPid:\t7\n")
    assert status["Name"] == "kworker/0:1H"
    assert status["Pid"] == "7"


def test_status_name_non_utf8():
    status = procfs.parse_status(b"Name:\tcaf\xe9\n")
    assert os.fsencode(status["Name"]) == b"caf\xe9"


# --- cgroup -----------------------------------------------------------------------

CGROUP_V1 = (b"12:pids:/system.slice/kubelet.service\n"
             b"11:memory:/system.slice/kubelet.service\n"
             b"4:cpu,cpuacct:/system.slice/kubelet.service\n"
             b"1:name=systemd:/system.slice/kubelet.service\n")
CGROUP_V2 = b"0::/system.slice/kubelet.service\n"
CGROUP_HYBRID = (b"12:memory:/kubepods/besteffort/pod7c1e\n"
                 b"4:cpu,cpuacct:/kubepods/besteffort/pod7c1e\n"
                 b"1:name=systemd:/kubepods/besteffort/pod7c1e\n"
                 b"0::/system.slice/containerd.service\n")


def test_cgroup_v1_lines():
    entries = procfs.parse_cgroup(CGROUP_V1)
    assert [entry.hierarchy_id for entry in entries] == [12, 11, 4, 1]
    assert entries[1].controllers == ("memory",)
    assert entries[2].controllers == ("cpu", "cpuacct")
    assert procfs.memory_cgroup_path(entries) == "/system.slice/kubelet.service"


def test_cgroup_v2_line():
    entries = procfs.parse_cgroup(CGROUP_V2)
    assert len(entries) == 1
    assert entries[0].hierarchy_id == 0
    assert entries[0].controllers == ()
    assert entries[0].path == "/system.slice/kubelet.service"
    assert procfs.memory_cgroup_path(entries) == "/system.slice/kubelet.service"


def test_cgroup_hybrid_prefers_v1_memory():
    entries = procfs.parse_cgroup(CGROUP_HYBRID)
    assert len(entries) == 4
    assert entries[3].path == "/system.slice/containerd.service"
    assert procfs.memory_cgroup_path(entries) == "/kubepods/besteffort/pod7c1e"


def test_cgroup_name_systemd_line():
    entries = procfs.parse_cgroup(b"1:name=systemd:/user.slice/user-1000.slice/session-3.scope\n")
    assert entries[0].hierarchy_id == 1
    assert entries[0].controllers == ("name=systemd",)
    assert entries[0].path == "/user.slice/user-1000.slice/session-3.scope"


def test_cgroup_name_systemd_not_memory():
    entries = procfs.parse_cgroup(b"1:name=systemd:/user.slice\n0::/system.slice/sshd.service\n")
    assert procfs.memory_cgroup_path(entries) == "/system.slice/sshd.service"


def test_cgroup_v1_without_memory():
    entries = procfs.parse_cgroup(b"4:cpu,cpuacct:/a\n1:name=systemd:/b\n")
    assert procfs.memory_cgroup_path(entries) == "/"


def test_cgroup_path_with_colon():
    entries = procfs.parse_cgroup(b"0::/kubepods.slice/pod:web:1\n")
    assert entries[0].path == "/kubepods.slice/pod:web:1"


def test_cgroup_empty():
    entries = procfs.parse_cgroup(b"")
    assert entries == []
    assert procfs.memory_cgroup_path(entries) == "/"


# --- cmdline ----------------------------------------------------------------------

CMDLINE_CASES = [
    pytest.param(b"kubelet\0--config\0/var/lib/kubelet/config.yaml\0",
                 ["kubelet", "--config", "/var/lib/kubelet/config.yaml"], id="nul-terminated"),
    pytest.param(b"", [], id="empty-kernel-thread-or-zombie"),
    pytest.param(b"sleep\x00\x0060\x00", ["sleep", "60"], id="empty-argument-dropped"),
    pytest.param(b"sleep\x0060", ["sleep", "60"], id="no-trailing-nul"),
    pytest.param(b"nginx: worker process", ["nginx: worker process"], id="rewritten-argv"),
    pytest.param(b"/opt/my app/run\0--name=a b\0", ["/opt/my app/run", "--name=a b"], id="spaces"),
    pytest.param(b"prog\0line1\nline2\0", ["prog", "line1\nline2"], id="newline"),
]


@pytest.mark.parametrize(("data", "expected"), CMDLINE_CASES)
def test_parse_cmdline(data: bytes, expected: list[str]):
    assert procfs.parse_cmdline(data) == expected


def test_parse_cmdline_non_utf8_round_trip():
    raw = b"/opt/caf\xe9/bin/run\xff"

    (arg,) = procfs.parse_cmdline(raw + b"\0")

    assert os.fsencode(arg) == raw


# --- errors -----------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOENT, errno.ESRCH])
def test_translate_gone(code: int):
    error = translate_proc_error(OSError(code, os.strerror(code)), 42, "/proc/42/maps")
    assert isinstance(error, ProcessGone)
    assert error.pid == 42


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_translate_denied(code: int):
    error = translate_proc_error(OSError(code, os.strerror(code)), 42, "/proc/42/maps")
    assert isinstance(error, AccessDenied)
    assert error.pid == 42
    assert error.path == "/proc/42/maps"


def test_translate_other_error_unchanged():
    original = OSError(errno.EIO, os.strerror(errno.EIO))
    assert translate_proc_error(original, 42, "/proc/42/maps") is original


# --- readers on the fixture tree --------------------------------------------------

@pytest.fixture
def proc_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture tree, for tests that remove or change files."""
    root = tmp_path / "proc"
    shutil.copytree(FIXTURE_PROC, root, symlinks=True)
    return root


def test_list_pids_fixture():
    assert procfs.list_pids(str(FIXTURE_PROC)) == [100, 200, 300]


def test_readers_running_process():
    root = str(FIXTURE_PROC)
    assert len(procfs.read_maps(100, root)) == 14
    assert procfs.read_stat(100, root).pid == 100
    assert procfs.read_status(100, root)["Threads"] == "23"
    assert procfs.read_comm(100, root) == "kubelet"
    assert procfs.read_exe(100, root) == "/usr/local/bin/kubelet"
    assert procfs.memory_cgroup_path(procfs.read_cgroup(100, root)) == "/system.slice/kubelet.service"


def test_readers_zombie():
    root = str(FIXTURE_PROC)
    assert procfs.read_maps(200, root) == []
    assert procfs.read_exe(200, root) is None
    assert procfs.read_stat(200, root).state == "Z"
    assert procfs.memory_cgroup_path(procfs.read_cgroup(200, root)) == "/kubepods/burstable/pod1f0c"


def test_read_maps_main_thread_exited():
    mappings = procfs.read_maps(300, str(FIXTURE_PROC))
    assert len(mappings) == 5
    assert mappings[0].path == "/usr/bin/containerd"


def test_read_maps_all_threads_vanished(proc_copy: Path):
    shutil.rmtree(proc_copy / "300" / "task" / "302")
    (proc_copy / "300" / "task" / "301" / "maps").unlink()
    assert procfs.read_maps(300, str(proc_copy)) == []


def test_read_exe_main_thread_exited():
    assert procfs.read_exe(300, str(FIXTURE_PROC)) == "/usr/bin/containerd"


READERS = [
    pytest.param(procfs.read_maps, id="maps"),
    pytest.param(procfs.read_stat, id="stat"),
    pytest.param(procfs.read_status, id="status"),
    pytest.param(procfs.read_cgroup, id="cgroup"),
    pytest.param(procfs.read_comm, id="comm"),
    pytest.param(procfs.read_exe, id="exe"),
]


@pytest.mark.parametrize("reader", READERS)
def test_reader_pid_vanished(proc_copy: Path, reader: Callable[[int, str], object]):
    pids = procfs.list_pids(str(proc_copy))
    assert 100 in pids
    shutil.rmtree(proc_copy / "100")
    with pytest.raises(ProcessGone) as caught:
        reader(100, str(proc_copy))
    assert caught.value.pid == 100


def test_read_stat_empty_file_is_gone(proc_copy: Path):
    # read_stat treats a stat file without bytes as a process that exited.
    (proc_copy / "100" / "stat").write_bytes(b"")
    with pytest.raises(ProcessGone):
        procfs.read_stat(100, str(proc_copy))


def test_read_maps_other_error_reaches_caller(proc_copy: Path):
    (proc_copy / "100" / "maps").unlink()
    (proc_copy / "100" / "maps").mkdir()
    with pytest.raises(IsADirectoryError):
        procfs.read_maps(100, str(proc_copy))


def test_read_cmdline_fixture_tree(tmp_path: Path):
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cmdline").write_bytes(b"/usr/bin/kubelet\0--v=2\0")

    assert procfs.read_cmdline(4242, str(tmp_path)) == ["/usr/bin/kubelet", "--v=2"]


def test_read_cmdline_missing_pid_is_process_gone(tmp_path: Path):
    with pytest.raises(ProcessGone) as excinfo:
        procfs.read_cmdline(4242, str(tmp_path))

    assert excinfo.value.pid == 4242


# --- access denied ----------------------------------------------------------------

@pytest.fixture
def shared_proc_copy() -> Iterator[Path]:
    """A copy of the fixture tree in a directory that user nobody (65534) may traverse.

    pytest's tmp_path sits below a directory of mode 0700, which would deny every read
    and hide whether the file's own mode caused EACCES.
    """
    parent = Path(tempfile.mkdtemp(prefix="prelock-proc-"))
    try:
        parent.chmod(0o755)
        root = parent / "proc"
        shutil.copytree(FIXTURE_PROC, root, symlinks=True)
        yield root
    finally:
        shutil.rmtree(parent)


def test_reader_access_denied(shared_proc_copy: Path):
    root = str(shared_proc_copy)
    (shared_proc_copy / "100" / "maps").chmod(0)

    def read_pid_100() -> dict:
        outcome: dict = {"uid": os.getuid(), "stat_pid": procfs.read_stat(100, root).pid}
        try:
            procfs.read_maps(100, root)
        except AccessDenied as exc:
            outcome.update(maps="AccessDenied", pid=exc.pid, path=exc.path)
        else:
            outcome["maps"] = "read"
        return outcome

    outcome = privdrop.call_as_nobody(read_pid_100)
    assert outcome["uid"] != 0
    assert outcome["stat_pid"] == 100
    assert outcome["maps"] == "AccessDenied"
    assert outcome["pid"] == 100
    assert outcome["path"] == f"{root}/100/maps"
