"""Configuration: YAML loading, complete validation, and the frozen settings it produces.

Validation collects every problem in a file before reporting, and each problem names the
file, line, dotted key, the value found and what is expected, so one run of
`prelock check-config` lists all of them. An empty file, or one with only comments, is
valid and means every default. A key present with no value (`exe:`) is an error rather
than a default, except `metrics.listen`, where no value means metrics are off.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from prelock.errors import ConfigError
from prelock.units import format_size, parse_duration, parse_percent, parse_size

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
    validator = _Validator(source)
    root = validator.compose(text)
    config = Config(source=source)
    if root is not None:
        config = validator.build_config(root)
    if validator.problems:
        raise InvalidConfigError(source, validator.problems)
    return config


# --- validation ----------------------------------------------------------------------

# Returned by a converter whose value was invalid; the problem is already recorded.
_INVALID = object()

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"

Converter = Callable[["_Validator", yaml.Node, str], object]


class _Validator:
    """Converter from a composed YAML node tree to settings that records every problem found."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[ConfigProblem] = []
        self._constructor = yaml.SafeLoader("")

    def compose(self, text: str) -> yaml.Node | None:
        """Return the root node, or None for an empty document or a YAML syntax error."""
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self._report_syntax_error(exc)
            return None
        except yaml.YAMLError as exc:
            self.problems.append(ConfigProblem(self.source, None, "", f"invalid YAML: {exc}"))
            return None
        if isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG:
            return None
        return root

    def _report_syntax_error(self, exc: yaml.MarkedYAMLError) -> None:
        mark = exc.problem_mark or exc.context_mark
        problem = f"invalid YAML: {exc.problem or exc.context}"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        line = mark.line + 1 if mark is not None else None
        self.problems.append(ConfigProblem(self.source, line, "", problem))

    def report(self, node: yaml.Node, key: str, problem: str, expected: str = "",
               show_value: bool = True) -> object:
        """Record a problem at node and return _INVALID, so converters can `return v.report(...)`."""
        got = self.describe(node) if show_value else None
        self.problems.append(ConfigProblem(self.source, node.start_mark.line + 1, key, problem, expected, got))
        return _INVALID

    def describe(self, node: yaml.Node) -> str:
        """Return the value of node for a message: a string quoted, other scalars as written."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if node.tag == _NULL_TAG:
            return "no value"
        text = repr(node.value) if node.tag == _STR_TAG else node.value
        return text if len(text) <= 80 else text[:77] + "..."

    def scalar(self, node: yaml.ScalarNode, key: str) -> object:
        """Return the Python value of a scalar node, or _INVALID for an unsupported tag."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            return self.report(node, key, f"unsupported YAML value ({problem})", "a plain YAML value")

    def mapping(self, node: yaml.Node, key: str, allowed: list[str]) -> dict[str, yaml.Node] | None:
        """Return the entries of a mapping node by key, recording unknown and duplicate keys."""
        expected = "a mapping with the keys " + ", ".join(allowed)
        if not isinstance(node, yaml.MappingNode):
            self.report(node, key or "(top level)", "not a mapping", expected)
            return None

        entries: dict[str, yaml.Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.report(key_node, key or "(top level)", "invalid key", "keys that are plain strings")
                continue
            name = key_node.value
            display_name = name if len(name) <= 40 else name[:37] + "..."
            dotted = f"{key}.{display_name}" if key else display_name
            if name not in allowed:
                self._report_unknown_key(key_node, dotted, allowed)
            elif name in entries:
                self.report(key_node, dotted, f"duplicate key, first set at line {key_lines[name]}",
                            "each key once", show_value=False)
            else:
                entries[name] = value_node
                key_lines[name] = key_node.start_mark.line + 1
        return entries

    def _report_unknown_key(self, key_node: yaml.Node, dotted: str, allowed: list[str]) -> None:
        expected = "one of " + ", ".join(allowed)
        close = difflib.get_close_matches(key_node.value, allowed, n=1)
        if close:
            expected += f" (did you mean {close[0]}?)"
        self.report(key_node, dotted, "unknown key", expected, show_value=False)

    def build_section(self, node: yaml.Node, key: str, cls: type, fields: dict[str, tuple[str, Converter]]):
        """Return cls built from a mapping node; keys absent or invalid keep cls's defaults."""
        entries = self.mapping(node, key, list(fields))
        kwargs = {}
        for name, value_node in (entries or {}).items():
            attribute, convert = fields[name]
            dotted = f"{key}.{name}" if key else name
            value = convert(self, value_node, dotted)
            if value is not _INVALID:
                kwargs[attribute] = value
        return cls(**kwargs)

    def build_config(self, root: yaml.Node) -> Config:
        config = self.build_section(root, "", Config, _CONFIG_FIELDS)
        return dataclasses.replace(config, source=self.source)


# --- converters: each returns the converted value, or _INVALID after reporting --------


def _to_scalar(v: _Validator, node: yaml.Node, key: str, expected: str) -> object:
    if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
        return v.report(node, key, "invalid value", expected)
    return v.scalar(node, key)


def _to_string(v: _Validator, node: yaml.Node, key: str, expected: str) -> object:
    value = _to_scalar(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if not isinstance(value, str):
        return v.report(node, key, "not a string", expected + " (quote values that YAML reads as numbers or booleans)")
    return value


def _to_bool(v: _Validator, node: yaml.Node, key: str) -> object:
    value = _to_scalar(v, node, key, "true or false")
    if value is _INVALID:
        return _INVALID
    if not isinstance(value, bool):
        return v.report(node, key, "not a boolean", "true or false, unquoted")
    return value


def _choice(options: tuple[str, ...]) -> Converter:
    expected = "one of " + ", ".join(options)

    def convert(v: _Validator, node: yaml.Node, key: str) -> object:
        value = _to_string(v, node, key, expected)
        if value is _INVALID:
            return _INVALID
        if value not in options:
            return v.report(node, key, "unknown value", expected)
        return value

    return convert


def _string_list(check_item: Callable[[_Validator, yaml.Node, str, str], object], item_expected: str,
                 example: str) -> Converter:
    """Return a converter for a list of strings that check_item converts or reports."""

    def convert(v: _Validator, node: yaml.Node, key: str) -> object:
        if not isinstance(node, yaml.SequenceNode):
            return v.report(node, key, "not a list", f"a list such as {example}, or [] for none")
        items = []
        for index, item_node in enumerate(node.value):
            item_key = f"{key}[{index}]"
            text = _to_string(v, item_node, item_key, item_expected)
            if text is _INVALID:
                continue
            item = check_item(v, item_node, item_key, text)
            if item is not _INVALID:
                items.append(item)
        if len(items) != len(node.value):
            return _INVALID
        return tuple(items)

    return convert


def _check_name(v: _Validator, node: yaml.Node, key: str, name: str) -> object:
    expected = _NAME
    if not name.strip():
        return v.report(node, key, "empty name", expected)
    if "/" in name or "\0" in name:
        return v.report(node, key, "a process name cannot contain '/' or NUL",
                        expected + " (put executable paths under critical.exe)")
    return name


def _check_exe_glob(v: _Validator, node: yaml.Node, key: str, glob: str) -> object:
    # Executable paths are absolute, so a glob that starts with neither '/' nor '*' never matches.
    if not glob.startswith(("/", "*")):
        return v.report(node, key, "not an absolute path glob", _EXE_GLOB + " or /opt/*/bin/*")
    return glob


def _check_regex(v: _Validator, node: yaml.Node, key: str, pattern: str) -> object:
    if not pattern:
        return v.report(node, key, "empty regex, which matches everything", "a non-empty regular expression")
    try:
        return re.compile(pattern)
    except re.error as exc:
        return v.report(node, key, f"invalid regex: {exc.msg} at position {exc.pos}",
                        "a Python regular expression (re module syntax)")


def _parse_size_value(v: _Validator, node: yaml.Node, key: str, allow_percent: bool) -> object:
    """Convert '4GiB', '10%' (when allowed) or an integer byte count into a Size."""
    if allow_percent:
        expected = "a percentage of MemTotal such as 10%, or a size such as 512MiB (units KiB, MiB, GiB, TiB)"
    else:
        expected = "a size such as 512MiB or 1GiB (units KiB, MiB, GiB, TiB)"
    value = _to_scalar(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return v.report(node, key, "invalid size", expected)

    if isinstance(value, str):
        fraction = parse_percent(value)
        if fraction is not None and not allow_percent:
            return v.report(node, key, "a percentage is not allowed here", expected)
        if fraction is not None:
            return Size(fraction=fraction)
        try:
            value = parse_size(value)
        except (ValueError, OverflowError):  # OverflowError: a number too long for a float
            return v.report(node, key, "invalid size", expected)

    if value < 0:
        return v.report(node, key, "negative size", expected)
    if value > MAX_SIZE_BYTES:
        return v.report(node, key, "too large", expected + ", below 8EiB")
    return Size(size_bytes=value)


def _to_budget(v: _Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=True)
    if size is _INVALID:
        return _INVALID
    if size.fraction is not None and not 0 < size.fraction <= 1:
        return v.report(node, key, "out of range", "a percentage above 0% and at most 100%")
    if size.size_bytes is not None and size.size_bytes < MIN_LOCK_SIZE_BYTES:
        return v.report(node, key, "too small to lock anything", "at least 4KiB, or a percentage such as 10%")
    return size


def _to_min_available(v: _Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=True)
    if size is _INVALID:
        return _INVALID
    if size.fraction is not None and size.fraction > 1:
        return v.report(node, key, "out of range", "a percentage from 0% to 100%")
    return size


def _to_file_size(v: _Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=False)
    if size is _INVALID:
        return _INVALID
    if size.size_bytes < MIN_LOCK_SIZE_BYTES:
        return v.report(node, key, "too small to lock anything", "at least 4KiB, such as 1GiB")
    return size.size_bytes


def _duration(min_s: float) -> Converter:
    expected = (f"a duration from {min_s:g}s to {MAX_DURATION_S / 3600:g}h"
                " with a unit: ms, s, m or h (such as 60s or 10m)")

    def convert(v: _Validator, node: yaml.Node, key: str) -> object:
        value = _to_scalar(v, node, key, expected)
        if value is _INVALID:
            return _INVALID
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return v.report(node, key, "missing unit", expected)
        if not isinstance(value, str):
            return v.report(node, key, "invalid duration", expected)
        try:
            seconds = parse_duration(value)
        except ValueError:
            return v.report(node, key, "invalid duration", expected)
        if not min_s <= seconds <= MAX_DURATION_S:
            return v.report(node, key, "out of range", expected)
        return seconds

    return convert


_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _to_listen(v: _Validator, node: yaml.Node, key: str) -> object:
    expected = "host:port such as 127.0.0.1:9464, [::1]:9464 or :9464 (port 1-65535), or \"\" for off"
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
        return None
    value = _to_string(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if value == "":
        return None

    host, colon, port = value.rpartition(":")
    if not colon or not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        return v.report(node, key, "invalid port", expected)
    if not _is_valid_host(host):
        return v.report(node, key, "invalid host", expected + "; IPv6 addresses go in brackets")
    return value


def _is_valid_host(host: str) -> bool:
    if host == "":
        return True
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return ":" not in host and _HOSTNAME_RE.fullmatch(host) is not None


def _to_state_dir(v: _Validator, node: yaml.Node, key: str) -> object:
    expected = "an absolute directory path such as /var/lib/prelock"
    value = _to_string(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if not value.startswith("/") or "\0" in value:
        return v.report(node, key, "not an absolute path", expected)
    return Path(value)


def _section(cls: type, fields: dict[str, tuple[str, Converter]]) -> Converter:
    def convert(v: _Validator, node: yaml.Node, key: str) -> object:
        return v.build_section(node, key, cls, fields)

    return convert


_NAME = "a process name such as kubelet"
_EXE_GLOB = "an executable path glob such as /usr/local/bin/kubelet"
_REGEX = "a regular expression"

_CRITICAL_FIELDS: dict[str, tuple[str, Converter]] = {
    "names": ("names", _string_list(_check_name, _NAME, "[kubelet, sshd]")),
    "exe": ("exe", _string_list(_check_exe_glob, _EXE_GLOB, "[/usr/local/bin/kubelet]")),
    "cgroups": ("cgroups", _string_list(_check_regex, _REGEX, r"['^/system\.slice/kubelet\.service$']")),
    "pod_cgroups": ("pod_cgroups", _string_list(_check_regex, _REGEX, "[kubepods]")),
}
_FILES_FIELDS: dict[str, tuple[str, Converter]] = {
    "include": ("include", _string_list(_check_regex, _REGEX, "['^/usr/']")),
    "exclude": ("exclude", _string_list(_check_regex, _REGEX, r"['\.debug$']")),
    "kinds": ("kinds", _choice(FILE_KINDS)),
}
_LOCK_FIELDS: dict[str, tuple[str, Converter]] = {
    "mode": ("mode", _choice(LOCK_MODES)),
    "budget": ("budget", _to_budget),
    "max_file_size": ("max_file_size_bytes", _to_file_size),
    "min_available": ("min_available", _to_min_available),
    "linger": ("linger_s", _duration(0.0)),
}
_SCAN_FIELDS: dict[str, tuple[str, Converter]] = {
    "interval": ("interval_s", _duration(1.0)),
}
_METRICS_FIELDS: dict[str, tuple[str, Converter]] = {
    "listen": ("listen", _to_listen),
}
_CONFIG_FIELDS: dict[str, tuple[str, Converter]] = {
    "critical": ("critical", _section(CriticalSelector, _CRITICAL_FIELDS)),
    "others": ("others", _to_bool),
    "files": ("files", _section(FileFilter, _FILES_FIELDS)),
    "lock": ("lock", _section(LockSettings, _LOCK_FIELDS)),
    "scan": ("scan", _section(ScanSettings, _SCAN_FIELDS)),
    "metrics": ("metrics", _section(MetricsSettings, _METRICS_FIELDS)),
    "state_dir": ("state_dir", _to_state_dir),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
}
