"""Configuration: YAML loading, complete validation, and the frozen settings it produces.

Validation collects every problem in a file before reporting, and each problem names the
file, line, dotted key, the value found and what is expected, so one run of
`prelock check-config` lists all of them. An empty file, or one with only comments, is
valid and means every default. A key present with no value (`exe:`) is an error rather
than a default, except `metrics.listen`, where no value means metrics are off. The
validator that walks the YAML nodes, and its converters, are in prelock.config_validate.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from prelock.errors import ConfigError
from prelock.units import format_size

DEFAULT_CONFIG_PATHS = ("/etc/prelock/prelock.yaml",)

# The kernel truncates comm to TASK_COMM_LEN - 1 = 15 bytes.
COMM_MAX_BYTES = 15

# A config file is a few KiB. The cap keeps a wrong path (a log file, an image) from
# being read whole.
MAX_CONFIG_BYTES = 1 << 20

# A budget or file-size limit below one 4 KiB page locks nothing, and a value such as
# `budget: 10` is far more likely a forgotten `%` than a real byte count.
MIN_LOCK_SIZE_BYTES = 4096

# Sizes reach syscalls as 64-bit values. A week is far longer than any useful scan
# interval or linger, so a larger duration is a typo such as 1000000h.
MAX_SIZE_BYTES = (1 << 63) - 1
MAX_DURATION_S = 7 * 24 * 3600.0

LOCK_MODES = ("working-set", "mapped", "whole-file")
FILE_KINDS = ("code", "all")
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_CRITICAL_NAMES = (
    "kubelet", "containerd", "containerd-shim-runc-v2", "dockerd", "crio", "sshd", "systemd",
    "systemd-journald", "systemd-logind", "systemd-udevd", "dbus-daemon", "dbus-broker",
    "chronyd", "agetty",
)

# Cgroup paths of containers: kubelet's pod hierarchy (both cgroup drivers), a pod UID
# directory (cgroupfs driver), and the scopes of Docker, containerd's CRI plugin, CRI-O
# and Podman.
DEFAULT_POD_CGROUP_PATTERNS = (
    r"kubepods",
    r"/pod[0-9a-f]{8}[-_][0-9a-f]{4}[-_]",
    r"docker-[0-9a-f]{12,}\.scope",
    r"/docker/[0-9a-f]{12,}",
    r"cri-containerd-[0-9a-f]{12,}",
    r"crio-[0-9a-f]{12,}",
    r"libpod-[0-9a-f]{12,}",
)
DEFAULT_POD_CGROUPS = tuple(re.compile(pattern) for pattern in DEFAULT_POD_CGROUP_PATTERNS)

_DELETED_SUFFIX = " (deleted)"


# --- settings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A size in bytes or a fraction of MemTotal. Exactly one of the two is set."""

    size_bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.size_bytes is None) == (self.fraction is None):
            raise ValueError("Size needs exactly one of size_bytes and fraction")

    def resolve(self, memtotal_bytes: int) -> int:
        """Return the size in bytes on a machine with memtotal_bytes of MemTotal."""
        if self.fraction is not None:
            return int(memtotal_bytes * self.fraction)
        return self.size_bytes

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_size(self.size_bytes)


@dataclass(frozen=True)
class CriticalSelector:
    """Rules that put a process in the critical tier."""

    names: tuple[str, ...] = DEFAULT_CRITICAL_NAMES
    exe: tuple[str, ...] = ()
    cgroups: tuple[re.Pattern, ...] = ()
    pod_cgroups: tuple[re.Pattern, ...] = DEFAULT_POD_CGROUPS

    def match(self, comm: str, exe: str | None, cgroup: str) -> str | None:
        """Return why a process is critical ("exe", "cgroup" or "name"), or None.

        comm is the content of /proc/PID/comm without the newline, exe the target of
        /proc/PID/exe (None when it cannot be read) and cgroup the path from
        /proc/PID/cgroup. A match by name alone counts only when the cgroup matches none
        of pod_cgroups, because any container can name its process "kubelet". When
        several rules match, the reason returned is the first of exe, cgroup, name.
        """
        exe_path = _strip_deleted(exe)
        # NOTE: /proc/PID/exe of a containerized process shows the path inside the
        # container, so an exe glob also matches a container binary at that path.
        if exe_path is not None and any(fnmatch.fnmatchcase(exe_path, glob) for glob in self.exe):
            return "exe"
        if any(pattern.search(cgroup) for pattern in self.cgroups):
            return "cgroup"
        if self.matches_name(comm, exe_path) and not any(p.search(cgroup) for p in self.pod_cgroups):
            return "name"
        return None

    def matches_name(self, comm: str, exe: str | None) -> bool:
        """Return whether comm or the executable's basename equals one of names.

        comm holds only the first 15 bytes of a longer name, so "containerd-shim-runc-v2"
        matches the comm "containerd-shim" (and so does any other name with that prefix).
        """
        comm_bytes = comm.encode("utf-8", "surrogateescape")
        exe_name = os.path.basename(exe) if exe else None
        for name in self.names:
            if name == exe_name or name.encode("utf-8")[:COMM_MAX_BYTES] == comm_bytes:
                return True
        return False


@dataclass(frozen=True)
class FileFilter:
    """Filter on the mapped files of a target that are candidates for locking."""

    include: tuple[re.Pattern, ...] = ()
    exclude: tuple[re.Pattern, ...] = ()
    kinds: str = "code"


@dataclass(frozen=True)
class LockSettings:
    mode: str = "working-set"
    budget: Size = Size(fraction=0.10)
    max_file_size_bytes: int = 1 << 30
    min_available: Size = Size(fraction=0.05)
    linger_s: float = 600.0


@dataclass(frozen=True)
class ScanSettings:
    interval_s: float = 60.0


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """Return (host, port) to bind, or None when metrics are off.

        The host is '' for a listen value such as ':9464', and an IPv6 host comes
        without its brackets.
        """
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.removeprefix("[").removesuffix("]"), int(port)


@dataclass(frozen=True)
class Config:
    critical: CriticalSelector = field(default_factory=CriticalSelector)
    others: bool = True
    files: FileFilter = field(default_factory=FileFilter)
    lock: LockSettings = field(default_factory=LockSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    state_dir: Path = Path("/var/lib/prelock")
    log_level: str = "info"
    source: str = "<defaults>"


def _strip_deleted(exe: str | None) -> str | None:
    # The kernel appends " (deleted)" to /proc/PID/exe once the binary is replaced, as a
    # package upgrade does. The process still runs the old binary and stays critical.
    if exe is not None and exe.endswith(_DELETED_SUFFIX):
        return exe[: -len(_DELETED_SUFFIX)]
    return exe


# --- errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a config: where it is, what is wrong and what is expected."""

    source: str
    line: int | None
    key: str
    problem: str
    expected: str = ""
    got: str | None = None

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        text = f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"
        if self.got is not None:
            text += f", got {self.got}"
        if self.expected:
            text += f"; expected {self.expected}"
        return text


class InvalidConfigError(ConfigError):
    """A config with one or more problems; str() lists all of them, one per line."""

    def __init__(self, source: str, problems: list[ConfigProblem]):
        self.source = source
        self.problems = tuple(sorted(problems, key=lambda p: p.line or 0))
        count = len(self.problems)
        header = f"invalid configuration in {source}: {count} error{'s' if count != 1 else ''}"
        super().__init__("\n".join([header, *(str(p) for p in self.problems)]))


# --- loading -------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate a config file.

    With path None, the first existing file of DEFAULT_CONFIG_PATHS is read, and with
    none of them present the defaults are returned. Raises ConfigError naming the file
    when it cannot be read, and InvalidConfigError (a ConfigError) listing every
    problem when its content is invalid.
    """
    if path is None:
        # lexists, so a dangling symlink is reported instead of silently ignored.
        path = next((p for p in DEFAULT_CONFIG_PATHS if os.path.lexists(p)), None)
        if path is None:
            return Config()
    source = os.fsdecode(path)
    return parse_config(read_config_text(source), source)


def read_config_text(path: str) -> str:
    """Return the text of a config file, or raise ConfigError saying why it cannot be read."""
    if not path:
        raise ConfigError("config path is empty; expected the path of a YAML file")
    if "\0" in path:
        raise ConfigError(f"config path {path!r} contains a NUL byte; expected the path of a YAML file")

    # O_NONBLOCK, because opening a FIFO for reading would otherwise block until a writer appears.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(_describe_open_error(path, exc)) from exc

    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: is a directory; expected a YAML file such as {DEFAULT_CONFIG_PATHS[0]}")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file ({_file_type(mode)}); expected a YAML file")
        data = _read_up_to(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: reading the config file failed: {exc.strerror}") from exc
    finally:
        os.close(fd)

    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {format_size(MAX_CONFIG_BYTES)}; expected a prelock YAML config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {exc.start}; expected a UTF-8 YAML file") from exc


def _read_up_to(fd: int, limit_bytes: int) -> bytes:
    chunks = []
    remaining = limit_bytes
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _describe_open_error(path: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{path}: config file not found; pass the path of an existing YAML file"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied reading the config file; run as a user that can read it"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a component of the path is not a directory; pass the path of an existing YAML file"
    return f"{path}: opening the config file failed: {exc.strerror}"


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate config text and return the Config it describes.

    Raises InvalidConfigError (a ConfigError) listing every problem, each with source,
    line and dotted key. Empty text, or text with only comments, gives the defaults.
    """
    # config_validate imports this module's dataclasses when it loads, so importing it at
    # the top of this module would be circular.
    from prelock.config_validate import Validator

    validator = Validator(source)
    root = validator.compose(text)
    config = Config(source=source)
    if root is not None:
        config = validator.build_config(root)
    if validator.problems:
        raise InvalidConfigError(source, validator.problems)
    return config
