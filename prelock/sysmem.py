"""Parsers and readers for the system-wide memory files of procfs and sysfs.

Covers /proc/meminfo, /proc/vmstat, /proc/slabinfo, /proc/pressure/{memory,io},
/proc/modules, /proc/swaps, the sysctls under /proc/sys/vm and
/sys/kernel/mm/lru_gen. Parsers take the file's text and return records with sizes
in bytes. Readers take a procfs or sysfs root, so tests can point them at fixture
trees, and let OSError through: the caller decides whether a missing file matters.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from dataclasses import dataclass

logger = logging.getLogger(__name__)

KIB = 1024

# The sysctls under /proc/sys/vm that decide how early the kernel reclaims and
# whether it overcommits. watermark_scale_factor exists since Linux 4.6.
VM_SYSCTLS = (
    "min_free_kbytes",
    "watermark_scale_factor",
    "swappiness",
    "overcommit_memory",
    "overcommit_ratio",
    "overcommit_kbytes",
)

PRESSURE_RESOURCES = ("memory", "io")


def _read_text(path: str) -> str:
    """Read a procfs or sysfs file as text. Non-UTF-8 bytes survive as surrogate escapes.

    Raises OSError(EINVAL) for anything but a regular file, so that a FIFO in a fixture
    tree cannot block the read. procfs and sysfs files are regular files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        with os.fdopen(fd, encoding="utf-8", errors="surrogateescape", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# /proc/meminfo and /proc/vmstat


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo text into values in bytes.

    Lines with a "kB" unit are multiplied by 1024. Lines without a unit, such as
    HugePages_Total, are counts and stay as they are. Lines that do not parse are
    skipped with a debug log, so a truncated last line loses only that field.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not key or not fields or not fields[0].isdigit():
            if line.strip():
                logger.debug("meminfo: skipped line %r", line)
            continue
        if len(fields) == 2 and fields[1] == "kB":
            values[key.strip()] = int(fields[0]) * KIB
        elif len(fields) == 1:
            values[key.strip()] = int(fields[0])
        else:
            logger.debug("meminfo: skipped line with unknown unit %r", line)
    return values


def read_meminfo(procfs: str = "/proc") -> dict[str, int]:
    return parse_meminfo(_read_text(f"{procfs}/meminfo"))


def parse_vmstat(text: str) -> dict[str, int]:
    """Parse /proc/vmstat text ("name value" lines) into counters.

    Values are page counts or event counts, as the kernel prints them.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("-").isdigit():
            values[fields[0]] = int(fields[1])
        elif line.strip():
            logger.debug("vmstat: skipped line %r", line)
    return values


def read_vmstat(procfs: str = "/proc") -> dict[str, int]:
    return parse_vmstat(_read_text(f"{procfs}/vmstat"))


# /proc/slabinfo


@dataclass(frozen=True)
class SlabCache:
    """One cache line of /proc/slabinfo (format version 2.1)."""

    name: str
    active_objects: int
    total_objects: int
    object_size_bytes: int
    objects_per_slab: int
    pages_per_slab: int
    active_slabs: int
    total_slabs: int

    def size_bytes(self, page_size: int) -> int:
        """Return the memory the cache's slabs occupy."""
        return self.total_slabs * self.pages_per_slab * page_size


# Fields after the name: 5 numbers, ": tunables" and 3 numbers, ": slabdata" and 3 numbers.
_SLAB_FIELDS_AFTER_NAME = 15


def parse_slabinfo(text: str) -> list[SlabCache]:
    """Parse /proc/slabinfo text into caches.

    Raises ValueError when the text does not start with a "slabinfo - version: 2.x"
    header. Malformed cache lines are skipped with one warning. A line identical to an
    earlier one is dropped: listings rebuilt from slabtop output can repeat a line, and
    counting a cache twice would double its size.
    """
    lines = text.splitlines()
    if not lines or not re.match(r"slabinfo - version: 2\.\d+\s*$", lines[0]):
        first = lines[0] if lines else ""
        raise ValueError(f"expected a 'slabinfo - version: 2.x' header, got {first!r}")

    caches: list[SlabCache] = []
    seen_lines: set[str] = set()
    skipped = 0
    for line in lines[1:]:
        if line.startswith("#") or not line.strip():
            continue
        normalized = " ".join(line.split())
        if normalized in seen_lines:
            logger.debug("slabinfo: dropped repeated line %r", line)
            continue
        seen_lines.add(normalized)
        cache = _parse_slab_line(line)
        if cache is None:
            skipped += 1
            continue
        caches.append(cache)

    if skipped:
        logger.warning("slabinfo: skipped %d malformed lines", skipped)
    return caches


def _parse_slab_line(line: str) -> SlabCache | None:
    # Cache names contain no whitespace, so a line has exactly one field before the numbers.
    fields = line.split()
    if len(fields) != 1 + _SLAB_FIELDS_AFTER_NAME:
        return None
    name, rest = fields[0], fields[1:]
    if rest[5:7] != [":", "tunables"] or rest[10:12] != [":", "slabdata"]:
        return None
    numbers = rest[0:5] + rest[12:14]
    if not all(number.isdigit() for number in numbers):
        return None
    active_objects, total_objects, object_size, per_slab, pages_per_slab, active_slabs, total_slabs = map(int, numbers)
    return SlabCache(name, active_objects, total_objects, object_size, per_slab, pages_per_slab,
                     active_slabs, total_slabs)


def read_slabinfo(procfs: str = "/proc") -> list[SlabCache]:
    """Read /proc/slabinfo; it is mode 0400, so non-root readers get PermissionError."""
    return parse_slabinfo(_read_text(f"{procfs}/slabinfo"))


# /proc/pressure


@dataclass(frozen=True)
class PressureLine:
    """One "some" or "full" line of a PSI file: percentages of wall time stalled."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Pressure:
    """A PSI file; full is None where the kernel prints no full line."""

    some: PressureLine
    full: PressureLine | None


def parse_pressure(text: str) -> Pressure:
    """Parse a /proc/pressure/* file. Raises ValueError when the some line is missing."""
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        values = dict(field.split("=", 1) for field in rest.split() if "=" in field)
        try:
            lines[kind] = PressureLine(float(values["avg10"]), float(values["avg60"]),
                                       float(values["avg300"]), int(values["total"]))
        except (KeyError, ValueError):
            logger.debug("pressure: skipped line %r", line)
    if "some" not in lines:
        raise ValueError(f"expected a 'some avg10=... total=...' line, got {text[:80]!r}")
    return Pressure(lines["some"], lines.get("full"))


def read_pressure(resource: str, procfs: str = "/proc") -> Pressure:
    """Read /proc/pressure/<resource> (Linux 4.20+, CONFIG_PSI, not disabled by psi=0)."""
    return parse_pressure(_read_text(f"{procfs}/pressure/{resource}"))


# /proc/modules


@dataclass(frozen=True)
class Module:
    """One loaded kernel module from /proc/modules.

    size_bytes is the module's own code and static data, not what it allocates.
    """

    name: str
    size_bytes: int
    use_count: int
    used_by: tuple[str, ...]
    state: str


def parse_modules(text: str) -> list[Module]:
    """Parse /proc/modules text; malformed lines are skipped with a debug log."""
    modules = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].isdigit() or not fields[2].lstrip("-").isdigit():
            if line.strip():
                logger.debug("modules: skipped line %r", line)
            continue
        used_by = tuple(name for name in fields[3].split(",") if name and name != "-")
        modules.append(Module(fields[0], int(fields[1]), int(fields[2]), used_by, fields[4]))
    return modules


def read_modules(procfs: str = "/proc") -> list[Module]:
    """Read /proc/modules; a kernel built without module support has no such file."""
    return parse_modules(_read_text(f"{procfs}/modules"))


# /proc/swaps


@dataclass(frozen=True)
class SwapArea:
    """One active swap area from /proc/swaps."""

    path: str
    kind: str
    size_bytes: int
    used_bytes: int
    priority: int


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def parse_swaps(text: str) -> list[SwapArea]:
    """Parse /proc/swaps text (a header line, then one line per area; sizes in KiB).

    The kernel escapes space, tab, newline and backslash in the path as \\ooo, so the
    path is split off from the right and unescaped.
    """
    areas = []
    for line in text.splitlines()[1:]:
        fields = line.rsplit(None, 4)
        if len(fields) != 5 or not all(field.lstrip("-").isdigit() for field in fields[2:]):
            if line.strip():
                logger.debug("swaps: skipped line %r", line)
            continue
        path = _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), fields[0])
        areas.append(SwapArea(path, fields[1], int(fields[2]) * KIB, int(fields[3]) * KIB, int(fields[4])))
    return areas


def read_swaps(procfs: str = "/proc") -> list[SwapArea]:
    return parse_swaps(_read_text(f"{procfs}/swaps"))


# /proc/sys/vm


def parse_sysctl_int(text: str) -> int:
    """Parse a sysctl file that contains one integer. Raises ValueError otherwise."""
    value = text.strip()
    if not value.lstrip("-").isdigit():
        raise ValueError(f"expected an integer, got {value[:40]!r}")
    return int(value)


def read_vm_sysctl(name: str, procfs: str = "/proc") -> int:
    """Read /proc/sys/vm/<name>, for example min_free_kbytes (in KiB, as the kernel names it)."""
    return parse_sysctl_int(_read_text(f"{procfs}/sys/vm/{name}"))


# /sys/kernel/mm/lru_gen


@dataclass(frozen=True)
class LruGen:
    """State of the multi-gen LRU (MGLRU, Linux 6.1+ with CONFIG_LRU_GEN)."""

    enabled_mask: int
    min_ttl_ms: int

    @property
    def enabled(self) -> bool:
        """Whether the main switch (bit 0x0001 of enabled) is on."""
        return bool(self.enabled_mask & 0x1)


def parse_lru_gen_enabled(text: str) -> int:
    """Parse /sys/kernel/mm/lru_gen/enabled, which the kernel prints as hex such as 0x0007."""
    value = text.strip()
    try:
        return int(value, 16)
    except ValueError:
        raise ValueError(f"expected a hex mask such as 0x0007, got {value[:40]!r}") from None


def read_lru_gen(sysfs: str = "/sys") -> LruGen:
    """Read enabled and min_ttl_ms; FileNotFoundError means the kernel has no MGLRU."""
    directory = f"{sysfs}/kernel/mm/lru_gen"
    enabled_mask = parse_lru_gen_enabled(_read_text(f"{directory}/enabled"))
    min_ttl_ms = parse_sysctl_int(_read_text(f"{directory}/min_ttl_ms"))
    return LruGen(enabled_mask, min_ttl_ms)
