"""Parsers and readers for /proc/PID/{maps,stat,status,cgroup,comm,cmdline,exe}.

Parsers take bytes and return records; readers take a procfs root so tests can point
them at fixture trees. Readers raise ProcessGone when the process exited and
AccessDenied when the kernel's ptrace check refused the read.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Iterator

from prelock import native
from prelock.errors import ProcessGone, translate_proc_error

DELETED_SUFFIX = " (deleted)"


@dataclass(frozen=True, slots=True)
class Mapping:
    """One line of /proc/PID/maps.

    path is decoded with surrogateescape, so non-UTF-8 bytes survive a round trip
    through os.fsencode. It may end in " (deleted)": only a file-key comparison distinguishes a
    deleted file from one whose name really ends so.
    """

    start: int
    end: int
    perms: str
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str

    @property
    def size_bytes(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def dev(self) -> int:
        """The device number as st_dev would report it."""
        return os.makedev(self.dev_major, self.dev_minor)

    @property
    def file_backed(self) -> bool:
        """True when an inode backs the mapping; [heap], [vdso] and anonymous maps have 0."""
        return self.inode != 0

    @property
    def map_files_name(self) -> str:
        """The entry name under /proc/PID/map_files: hex without leading zeros."""
        return f"{self.start:x}-{self.end:x}"


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat that prelock uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    minflt: int
    majflt: int
    starttime_ticks: int
    rss_pages: int


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    """One line of /proc/PID/cgroup: hierarchy 0 with no controllers is cgroup v2."""

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


def parse_maps(data: bytes) -> list[Mapping]:
    """Parse /proc/PID/maps text.

    The path is the sixth field and may contain spaces, so a line is split into at most
    six fields. The kernel escapes only a newline in a path, as \\012.
    """
    mappings = []
    # Split at newlines only: the kernel escapes a newline in a path but not a '\r',
    # which bytes.splitlines() would also split at.
    for line in data.split(b"\n"):
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        start, _, end = fields[0].partition(b"-")
        major, _, minor = fields[3].partition(b":")
        path = fields[5].replace(b"\\012", b"\n") if len(fields) == 6 else b""
        mappings.append(Mapping(
            start=int(start, 16),
            end=int(end, 16),
            perms=fields[1].decode("ascii"),
            offset=int(fields[2], 16),
            dev_major=int(major, 16),
            dev_minor=int(minor, 16),
            inode=int(fields[4]),
            path=os.fsdecode(path),
        ))
    return mappings


def parse_stat(data: bytes) -> Stat:
    """Parse /proc/PID/stat; comm may hold spaces and ')', so split at the last ')'."""
    head, _, tail = data.rpartition(b")")
    pid_text, _, comm = head.partition(b" (")
    fields = tail.split()
    # fields[0] is field 3 (state) of proc_pid_stat(5).
    return Stat(
        pid=int(pid_text),
        comm=os.fsdecode(comm),
        state=fields[0].decode("ascii"),
        ppid=int(fields[1]),
        minflt=int(fields[7]),
        majflt=int(fields[9]),
        starttime_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def parse_status(data: bytes) -> dict[str, str]:
    """Parse /proc/PID/status into a dict of key to the raw value text."""
    status = {}
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b":")
        if sep:
            status[key.decode("ascii", "replace")] = os.fsdecode(value.strip())
    return status


def parse_cgroup(data: bytes) -> list[CgroupEntry]:
    """Parse /proc/PID/cgroup (v1 lines, the v2 line '0::/path', or both)."""
    entries = []
    for line in data.split(b"\n"):
        hierarchy, _, rest = line.partition(b":")
        controllers, _, path = rest.partition(b":")
        if not hierarchy.isdigit():
            continue
        names = tuple(c for c in controllers.decode("ascii", "replace").split(",") if c)
        entries.append(CgroupEntry(int(hierarchy), names, os.fsdecode(path)))
    return entries


def memory_cgroup_path(entries: list[CgroupEntry]) -> str:
    """Return the process's memory cgroup path: the v1 memory hierarchy, else the v2 one.

    Returns "/" when neither is listed (no cgroups mounted, or a kernel thread).
    """
    for entry in entries:
        if "memory" in entry.controllers:
            return entry.path
    for entry in entries:
        if entry.hierarchy_id == 0 and not entry.controllers:
            return entry.path
    return "/"


def parse_cmdline(data: bytes) -> list[str]:
    """Split /proc/PID/cmdline into arguments, decoded with surrogateescape.

    The arguments are NUL-terminated. Empty arguments are dropped, so an empty file
    (a kernel thread or a zombie) gives []. A process that rewrote its argv area may
    show all of it as one argument.
    """
    return [os.fsdecode(arg) for arg in data.split(b"\0") if arg]


def list_pids(procfs: str = "/proc") -> list[int]:
    """Return the PIDs present in procfs, ascending."""
    return sorted(int(name) for name in os.listdir(procfs) if name.isdigit())


def _read(pid: int, name: str, procfs: str) -> bytes:
    path = f"{procfs}/{pid}/{name}"
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise translate_proc_error(exc, pid, path) from exc


def read_maps(pid: int, procfs: str = "/proc") -> list[Mapping]:
    """Read the mappings of pid, through PROCMAP_QUERY where the kernel has it."""
    return read_task_maps(pid, procfs)[1]


def read_task_maps(pid: int, procfs: str = "/proc") -> tuple[int, list[Mapping]]:
    """Read the mappings of pid, and return them with the id to use under procfs for them.

    Zombies and kernel threads have no mappings. A process whose main thread exited
    while other threads run also reads as empty, and so do its pagemap and map_files.
    The fallback is a live thread: /proc/TID works for any thread id, although readdir
    of /proc lists only process ids.
    """
    mappings = _read_maps_file(pid, "maps", procfs)
    if mappings:
        return pid, mappings
    for tid in _live_threads(pid, procfs):
        try:
            mappings = _read_maps_file(pid, f"task/{tid}/maps", procfs)
        except ProcessGone:
            continue
        if mappings:
            return tid, mappings
    return pid, []


def _read_maps_file(pid: int, name: str, procfs: str) -> list[Mapping]:
    if not native.has_procmap_query():
        return parse_maps(_read(pid, name, procfs))
    path = f"{procfs}/{pid}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise translate_proc_error(exc, pid, path) from exc
    try:
        return query_maps(fd, path)
    except OSError as exc:
        # ESRCH here means the task has no mm (a zombie, a kernel thread, or a leader whose
        # thread exited) while the /proc entry is open, which the maps text reads as empty.
        if exc.errno == errno.ESRCH:
            return []
        # A fixture tree has plain files. The ioctl's name buffer has room for PATH_MAX
        # bytes, while the text contains the whole path.
        if exc.errno in (errno.ENOTTY, errno.ENAMETOOLONG):
            return parse_maps(_read(pid, name, procfs))
        raise translate_proc_error(exc, pid, path) from exc
    finally:
        os.close(fd)


def query_maps(maps_fd: int, path: str) -> list[Mapping]:
    """Walk every VMA with the PROCMAP_QUERY ioctl (Linux 6.11+): no text parsing, and
    the path comes back as the exact bytes, newlines included."""
    mappings = []
    addr = 0
    while (vma := native.procmap_query(maps_fd, addr, path=path)) is not None:
        perms = "".join((
            "r" if vma.flags & native.PROCMAP_QUERY_VMA_READABLE else "-",
            "w" if vma.flags & native.PROCMAP_QUERY_VMA_WRITABLE else "-",
            "x" if vma.flags & native.PROCMAP_QUERY_VMA_EXECUTABLE else "-",
            "s" if vma.flags & native.PROCMAP_QUERY_VMA_SHARED else "p",
        ))
        mappings.append(Mapping(vma.start, vma.end, perms, vma.offset, vma.dev_major, vma.dev_minor,
                                vma.inode, os.fsdecode(vma.name)))
        addr = vma.end
    return mappings


def _live_threads(pid: int, procfs: str) -> Iterator[int]:
    try:
        names = os.listdir(f"{procfs}/{pid}/task")
    except OSError:
        return
    for name in names:
        if name.isdigit() and int(name) != pid:
            yield int(name)


def read_stat(pid: int, procfs: str = "/proc") -> Stat:
    data = _read(pid, "stat", procfs)
    if not data:
        raise ProcessGone(pid)
    return parse_stat(data)


def read_status(pid: int, procfs: str = "/proc") -> dict[str, str]:
    return parse_status(_read(pid, "status", procfs))


def read_cgroup(pid: int, procfs: str = "/proc") -> list[CgroupEntry]:
    return parse_cgroup(_read(pid, "cgroup", procfs))


def read_comm(pid: int, procfs: str = "/proc") -> str:
    return os.fsdecode(_read(pid, "comm", procfs).rstrip(b"\n"))


def read_cmdline(pid: int, procfs: str = "/proc") -> list[str]:
    return parse_cmdline(_read(pid, "cmdline", procfs))


def read_exe(pid: int, procfs: str = "/proc") -> str | None:
    """Return the executable path of pid, or None for kernel threads and zombies."""
    path = f"{procfs}/{pid}/exe"
    try:
        return os.readlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise translate_proc_error(exc, pid, path) from exc

    # A kernel thread or zombie has no exe link while its /proc directory remains, and
    # neither has a process whose main thread exited, but its live threads do.
    for tid in _live_threads(pid, procfs):
        try:
            return os.readlink(f"{procfs}/{pid}/task/{tid}/exe")
        except OSError:
            continue
    if os.path.exists(f"{procfs}/{pid}"):
        return None
    raise ProcessGone(pid)
