"""The node around the memory: memory cgroups, running processes, kubelet and prelock itself.

A process that exits or a file that cannot be read is not an error here. The records
carry a note or an error text instead, and scan_processes logs each skipped process at
debug level.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from prelock import cgroupfs, native, pagecache, procfs
from prelock.errors import AccessDenied, ProcessGone
from prelock.files import FileSkipped

logger = logging.getLogger(__name__)

STATE_DIRS = ("/run/prelock", "/var/lib/prelock")
STATUS_FILE = "status.json"
# Names of a CPython interpreter as argv[0]: python, python3, python3.11.
_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?")
# Modules that `python -m` runs as the prelock command line.
_PRELOCK_MODULES = ("prelock", "prelock.cli")
# Interpreter options whose value is the next argument.
_PYTHON_OPTIONS_WITH_VALUE = ("-W", "-X")
EARLY_OOM_DAEMONS = ("earlyoom", "systemd-oomd", "oomd", "nohang")
# Memory cgroups of the node agents and of the pods, for the systemd and cgroupfs drivers.
CGROUP_NAMES = ("kubepods.slice", "kubepods", "system.slice")


@dataclass(frozen=True)
class CgroupUsage:
    name: str
    path: str
    usage_bytes: int
    limit_bytes: int | None
    anon_bytes: int | None
    file_bytes: int | None
    kernel_bytes: int | None


@dataclass(frozen=True)
class CgroupState:
    version: int | None
    mount: str | None
    groups: tuple[CgroupUsage, ...]
    note: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    comm: str
    argv: tuple[str, ...]
    ppid: int | None = None  # None when /proc/PID/stat could not be read


@dataclass(frozen=True)
class StatusFile:
    path: str
    pid: int | None
    locked_bytes: int | None
    age_s: float | None
    error: str | None = None
    running: bool | None = None  # whether the recorded pid is still a prelock process


@dataclass(frozen=True)
class KubeletState:
    """The running kubelet, how much of its executable is in the page cache, and its reserves."""

    pid: int | None
    exe: str | None
    size_bytes: int | None
    cached_bytes: int | None
    method: str | None
    note: str | None
    system_reserved_memory: str | None = None
    eviction_hard_memory: str | None = None


@dataclass(frozen=True)
class Protection:
    daemon_pids: tuple[int, ...]
    status_files: tuple[StatusFile, ...]
    status_note: str | None
    mlocked_bytes: int | None
    kubelet: KubeletState
    early_oom: tuple[ProcessInfo, ...]


# Memory cgroups


def read_cgroups(sysfs_root: str = "/sys") -> CgroupState:
    """Read usage and limits of the kubepods and system.slice memory cgroups."""
    controller = cgroupfs.find_memory_controller(sysfs_root)
    if controller is None:
        return CgroupState(None, None, (), f"no memory cgroup controller under {sysfs_root}/fs/cgroup")

    groups, problems = [], []
    for name in CGROUP_NAMES:
        try:
            memory = cgroupfs.read_memory(controller, "/" + name)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
            continue
        if memory is not None:
            groups.append(_cgroup_usage(name, controller, memory))

    note = "; ".join(problems) or None
    if not groups and not problems:
        note = f"none of {', '.join(CGROUP_NAMES)} exists under {controller.mount}"
    return CgroupState(controller.version, str(controller.mount), tuple(groups), note)


def _cgroup_usage(name: str, controller: cgroupfs.MemoryController, memory: cgroupfs.CgroupMemory) -> CgroupUsage:
    stats = memory.stat
    if controller.version == 1:
        anon, file_bytes, kernel = stats.get("total_rss"), stats.get("total_cache"), None
    else:
        anon, file_bytes = stats.get("anon"), stats.get("file")
        # memory.stat has a "kernel" total since Linux 5.18. Before that, sum its parts.
        parts = [stats[key] for key in ("kernel_stack", "pagetables", "percpu", "sock", "vmalloc", "slab")
                 if key in stats]
        kernel = stats.get("kernel", sum(parts) if parts else None)
    return CgroupUsage(name, str(controller.directory(memory.path)), memory.usage_bytes, memory.limit_bytes,
                       anon, file_bytes, kernel)


# Protection state


def scan_processes(procfs_root: str = "/proc") -> list[ProcessInfo]:
    """Read comm and cmdline of every process, skipping processes that exit or cannot be read."""
    try:
        pids = procfs.list_pids(procfs_root)
    except OSError as exc:
        logger.warning("failed to list processes in %s: %s", procfs_root, exc.strerror)
        return []
    processes = []
    for pid in pids:
        try:
            comm = procfs.read_comm(pid, procfs_root)
            argv = tuple(procfs.read_cmdline(pid, procfs_root))
        except (ProcessGone, AccessDenied, OSError) as exc:
            logger.debug("skipped process %d: %s", pid, exc)
            continue
        processes.append(ProcessInfo(pid, comm, argv, _read_ppid(pid, procfs_root)))
    return processes


def _read_ppid(pid: int, procfs_root: str) -> int | None:
    try:
        return procfs.read_stat(pid, procfs_root).ppid
    except (ProcessGone, AccessDenied, OSError, ValueError) as exc:
        logger.debug("parent of process %d unknown: %s", pid, exc)
        return None


def find_daemons(processes: list[ProcessInfo]) -> tuple[int, ...]:
    """Return the PIDs of the processes that are a prelock daemon, each daemon once.

    A process whose child is a daemon with the same argv is left out, so a wrapper
    that starts the daemon under its own command line does not count twice.
    """
    daemons = [process for process in processes if is_prelock_run(process.argv)]
    argv_by_pid = {process.pid: process.argv for process in daemons}
    wrappers = {process.ppid for process in daemons if argv_by_pid.get(process.ppid) == process.argv}
    return tuple(process.pid for process in daemons if process.pid not in wrappers)


def is_prelock_run(argv: tuple[str, ...]) -> bool:
    """Return whether argv is itself `prelock run`, rather than a wrapper that starts it.

    argv[0] must be the prelock command, or a Python interpreter that runs the prelock
    script (`python3 /usr/local/bin/prelock run`, as the kernel starts a script with a
    shebang) or the prelock module (`python3 -m prelock run`). `sudo prelock run` and
    `sh -c 'prelock run'` are wrappers, and their child is the daemon.
    """
    if not argv:
        return False
    program = os.path.basename(argv[0])
    if program == "prelock":
        return _subcommand(argv[1:]) == "run"
    if _PYTHON_NAME.fullmatch(program):
        prelock_args = _args_after_interpreter(argv[1:])
        return prelock_args is not None and _subcommand(prelock_args) == "run"
    return False


def _args_after_interpreter(args: tuple[str, ...]) -> tuple[str, ...] | None:
    """Return the arguments of the prelock command line that a Python interpreter runs, or None."""
    skip_value = False
    for index, arg in enumerate(args):
        if skip_value:
            skip_value = False
        elif arg.startswith("-m"):
            module = arg[2:] or (args[index + 1] if index + 1 < len(args) else "")
            rest = index + 1 if arg[2:] else index + 2
            return args[rest:] if module in _PRELOCK_MODULES else None
        elif arg.startswith("-c"):
            return None
        elif arg in _PYTHON_OPTIONS_WITH_VALUE:
            skip_value = True
        elif not arg.startswith("-"):
            return args[index + 1:] if os.path.basename(arg) == "prelock" else None
    return None


def _subcommand(args: tuple[str, ...]) -> str | None:
    skip_value = False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--log-level":
            skip_value = True
        elif not arg.startswith("-"):
            return arg
    return None


def _is_prelock(pid: int) -> bool:
    """Check that pid runs prelock, not a later process that reused a dead daemon's pid."""
    try:
        return any("prelock" in argument for argument in procfs.read_cmdline(pid))
    except (ProcessGone, AccessDenied, OSError):
        return False


def read_status_files(state_dirs: tuple[str, ...]) -> list[StatusFile]:
    """Read the status file that a running daemon writes into its state directory."""
    found = []
    for directory in state_dirs:
        path = Path(directory, STATUS_FILE)
        try:
            # A FIFO or device at the path would block read_text().
            if path.exists() and not path.is_file():
                raise OSError(errno.EINVAL, "not a regular file")
            record = json.loads(path.read_text())
            updated_at = float(record.get("updated_at", path.stat().st_mtime))
            pid, locked = record.get("pid"), record.get("locked_bytes")
            pid = int(pid) if pid is not None else None
            running = record.get("running", True) is not False and pid is not None and _is_prelock(pid)
            found.append(StatusFile(str(path), pid, int(locked) if locked is not None else None,
                                    max(0.0, time.time() - updated_at), running=running))
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(StatusFile(str(path), None, None, None, f"read failed: {exc.strerror}"))
        except (ValueError, TypeError, AttributeError) as exc:
            found.append(StatusFile(str(path), None, None, None, f"invalid status file: {exc}"))
    return found


def measure_file(path: str, backend: str | None = None) -> pagecache.Residency:
    """Measure how much of a regular file is in the page cache (cachestat, else mincore)."""
    fd, st = pagecache.open_regular_file(path)
    try:
        return pagecache.measure(fd, st, backend or pagecache.default_backend(), path)
    finally:
        os.close(fd)


def inspect_kubelet(processes: list[ProcessInfo], procfs_root: str = "/proc") -> KubeletState:
    """Find a running kubelet and measure how much of its executable is cached."""
    kubelets = [process for process in processes if process.comm == "kubelet"]
    if not kubelets:
        return KubeletState(None, None, None, None, None, "no running kubelet found")
    kubelet = kubelets[0]
    reserved, eviction, settings_note = kubelet_settings(kubelet, procfs_root)
    exe_link = f"{procfs_root}/{kubelet.pid}/exe"
    backend = pagecache.default_backend()
    try:
        exe = procfs.read_exe(kubelet.pid, procfs_root)
        residency = measure_file(exe_link, backend)
    except (ProcessGone, AccessDenied, FileSkipped, OSError) as exc:
        note = f"cannot measure {exe_link}: {exc}"
        return KubeletState(kubelet.pid, None, None, None, None, note, reserved, eviction)

    cached = None
    if residency.cached_pages is not None:
        # Whole pages are counted, so a cached last page would count more than the file holds.
        cached = min(residency.cached_pages * native.PAGE_SIZE, residency.size_bytes)
    note = "; ".join(text for text in (residency.unknown_reason, settings_note) if text) or None
    return KubeletState(kubelet.pid, exe, residency.size_bytes, cached, backend, note, reserved, eviction)


def kubelet_settings(kubelet: ProcessInfo, procfs_root: str) -> tuple[str | None, str | None, str | None]:
    """Return kubelet's system-reserved memory, its memory.available eviction threshold and a note.

    Flags win over the config file, as in kubelet. None means the setting is absent.
    """
    flags = _parse_flags(kubelet.argv[1:], ("system-reserved", "eviction-hard", "config"))
    reserved = _pick_entry(flags.get("system-reserved"), "memory", "=")
    eviction = _pick_entry(flags.get("eviction-hard"), "memory.available", "<")
    config_path = flags.get("config")
    if config_path is None or (reserved is not None and eviction is not None):
        return reserved, eviction, None

    # The path is relative to kubelet's root and working directory, not to ours.
    base = "root" if config_path.startswith("/") else "cwd/"
    path = f"{procfs_root}/{kubelet.pid}/{base}{config_path}"
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        reserved = reserved or (config.get("systemReserved") or {}).get("memory")
        eviction = eviction or (config.get("evictionHard") or {}).get("memory.available")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        return reserved, eviction, f"cannot read kubelet config {path}: {exc}"
    return reserved, eviction, None


def _parse_flags(args: tuple[str, ...], names: tuple[str, ...]) -> dict[str, str]:
    flags = {}
    for index, arg in enumerate(args):
        name, sep, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or name not in names:
            continue
        if sep:
            flags[name] = value
        elif index + 1 < len(args):
            flags[name] = args[index + 1]
    return flags


def _pick_entry(text: str | None, key: str, separator: str) -> str | None:
    """Return the value of key in 'a=1,b=2' (or 'a<1,b<2') text, or None."""
    for entry in (text or "").split(","):
        name, sep, value = entry.partition(separator)
        if sep and name.strip() == key:
            return value.strip()
    return None


def inspect_protection(procfs_root: str, meminfo: dict[str, int] | None,
                       state_dirs: tuple[str, ...] | None) -> Protection:
    """Report the running prelock daemon, locked bytes, kubelet residency and early-OOM daemons.

    state_dirs None skips the status files, for runs against a fixture procfs.
    """
    processes = scan_processes(procfs_root)
    daemons = find_daemons(processes)
    early_oom = tuple(process for process in processes if process.comm in EARLY_OOM_DAEMONS)
    if state_dirs is None:
        status_files, status_note = [], "not checked: --procfs-root is not /proc"
    else:
        status_files = read_status_files(state_dirs)
        status_note = None if status_files else f"no {STATUS_FILE} in {' or '.join(state_dirs)}"
    mlocked = meminfo.get("Mlocked") if meminfo else None
    return Protection(daemons, tuple(status_files), status_note, mlocked,
                      inspect_kubelet(processes, procfs_root), early_oom)
