"""`prelock bench thrash`: a memory cgroup that runs out, measured with and without locking.

Each mode runs a fresh memory cgroup with two workloads from prelock.bench_workload: a
critical process that reads its whole file-backed working set every 50 ms, and a hog
that runs code from its own file and leaks anonymous memory. Without locking, reclaim
inside the cgroup keeps evicting file pages that the two processes fault straight back
in, so the hog lives on while the critical process stalls. With the file pages locked,
reclaim runs out of pages to evict and the OOM killer ends the hog within seconds.

A locker (the prelock daemon or vmtouch) runs outside the cgroup and is ready before the
hog starts. Between modes the bench evicts its own files from the page cache.
This module only measures and returns records; the CLI renders them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import psutil
import yaml

from prelock import cgroupfs, native, procfs
from prelock.config import parse_config
from prelock.errors import ConfigError, PrelockError, PrivilegeError, ProcessGone
from prelock.files import MEMORY_FS_MAGICS, file_key
from prelock.units import format_size

log = logging.getLogger(__name__)

MiB = 1 << 20
MODES = ("none", "critical", "all", "vmtouch")
DEFAULT_MODES = ("none", "critical", "all")
LOCK_SCOPES = ("bench", "machine")
CGROUP_PREFIX = "prelock-bench-"

# How often the bench samples the processes and reports progress while a mode runs.
_TICK_S = 0.25
# Upper bounds for a locker to lock the working set, and for a workload to start.
_LOCKER_READY_TIMEOUT_S = 60.0
_WORKLOAD_READY_TIMEOUT_S = 30.0
# The first pass of the critical process faults its whole working set in from disk.
# This bounds the wait for that first heartbeat.
_FIRST_HEARTBEAT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ThrashSettings:
    """Parameters of one `prelock bench thrash` run; sizes in bytes, times in seconds."""

    limit_bytes: int = 512 * MiB
    critical_bytes: int = 192 * MiB
    hog_bytes: int = 96 * MiB
    leak_bytes: int = 4 * MiB  # anonymous memory the hog leaks per pass
    hog_touch_pages: int = 512  # random code pages the hog reads per pass
    hog_pause_s: float = 0.02
    heartbeat_interval_s: float = 0.05
    modes: tuple[str, ...] = DEFAULT_MODES
    max_seconds: float = 90.0  # per mode, from the start of the hog
    baseline_seconds: float = 10.0
    after_kill_s: float = 2.0  # heartbeats recorded after the hog died, for the plot
    scan_interval_s: float = 1.0
    # bench: the daemon locks only files in the bench directory; machine: every file the
    # shipped defaults select, for every process on the machine.
    lock_scope: str = "bench"
    directory: str | None = None  # parent of the bench files; a temporary directory by default


@dataclass(frozen=True)
class HeartbeatStats:
    """Durations of the critical process's heartbeats (full passes over its working set)."""

    count: int
    p50_s: float
    p99_s: float
    max_s: float


@dataclass
class ModeResult:
    """Measurements of one mode. Times are seconds since the hog was started."""

    mode: str
    hog_killed: bool  # the hog died of SIGKILL while the cgroup counted an OOM kill
    hog_end_s: float  # when the hog died, or when the mode stopped with the hog alive
    hog_exit: str  # "oom-killed", "alive", or how it exited otherwise
    critical_alive: bool
    heartbeat: HeartbeatStats
    critical_major_faults: int  # since the hog was started
    critical_read_bytes: int  # read from disk since the hog was started
    locked_bytes: int  # maximum the locker held during the mode
    oom_kills: int
    hog_leaked_bytes: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start_s, duration_s)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ThrashReport:
    settings: ThrashSettings
    machine: dict
    baseline: HeartbeatStats | None = None
    modes: list[ModeResult] = field(default_factory=list)


@dataclass(frozen=True)
class Progress:
    """One progress update while a phase runs."""

    phase: str  # "baseline" or a mode name
    elapsed_s: float
    total_s: float
    usage_bytes: int
    last_heartbeat_s: float | None
    hog_leaked_bytes: int
    hog_alive: bool


ProgressCallback = Callable[[Progress], None]


# Pure helpers: statistics, parsers and the generated daemon config.

def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values (fraction in (0, 1])."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_heartbeats(durations_s: list[float]) -> HeartbeatStats:
    if not durations_s:
        return HeartbeatStats(0, math.nan, math.nan, math.nan)
    return HeartbeatStats(len(durations_s), percentile(durations_s, 0.50),
                          percentile(durations_s, 0.99), max(durations_s))


def parse_workload_line(line: str) -> tuple[str, list[float]] | None:
    """Split a workload's output line into its kind and numbers; None when malformed."""
    kind, _, rest = line.strip().partition(" ")
    try:
        numbers = [float(word) for word in rest.split()]
    except ValueError:
        return None
    expected = {"ready": 1, "heartbeat": 2, "pass": 2}.get(kind)
    if expected is None or len(numbers) != expected:
        return None
    return kind, numbers


def parse_smaps_locked_rss(text: str) -> int:
    """Sum Rss over the mappings in /proc/PID/smaps text whose VmFlags contain 'lo'.

    Rss counts each resident page once per process, unlike the Locked: field, which
    counts a proportional share of pages that other processes map too.
    """
    total_bytes = 0
    rss_kib = 0
    for line in text.splitlines():
        if line.startswith("Rss:"):
            rss_kib = int(line.split()[1])
        elif line.startswith("VmFlags:"):
            if "lo" in line.split()[1:]:
                total_bytes += rss_kib * 1024
            rss_kib = 0
    return total_bytes


def daemon_config(mode: str, settings: ThrashSettings, state_dir: str, bench_dir: str) -> dict:
    """Return the config for `prelock run` in mode "critical" or "all".

    "critical" locks the bench-critical process only. "all" keeps the shipped defaults
    (critical names, others: true, the default budget) with a short scan interval. With
    lock_scope "bench" both lock only files in bench_dir, so the bench never locks the
    code of processes it did not start.
    """
    config: dict = {
        "scan": {"interval": f"{settings.scan_interval_s:g}s"},
        "state_dir": state_dir,
        "log_level": "info",
    }
    if mode == "critical":
        config["critical"] = {"names": ["bench-critical"]}
        config["others"] = False
    elif mode != "all":
        raise ValueError(f"mode {mode!r} does not run the prelock daemon")
    if settings.lock_scope == "bench":
        config["files"] = {"include": ["^" + re.escape(bench_dir.rstrip("/") + "/")]}
    return config


def hog_outcome(returncode: int | None, oom_kills: int) -> str:
    """Name how the hog ended: alive, oom-killed, killed by a signal, or its exit status."""
    if returncode is None:
        return "alive"
    if returncode == -signal.SIGKILL and oom_kills > 0:
        return "oom-killed"
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


def report_to_json(report: ThrashReport) -> dict:
    """Return the report as plain data; NaN (no heartbeat recorded) becomes null."""
    return _replace_nan(asdict(report))


def _replace_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _replace_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nan(item) for item in value]
    return value


# Preconditions and the bench files.

def check_can_run(settings: ThrashSettings, mountinfo: str = "/proc/self/mountinfo") -> cgroupfs.MemoryController:
    """Return the memory controller to use; raise PrivilegeError or, on bad settings, ConfigError.

    PrivilegeError means the bench cannot create a memory cgroup: not root, or no
    memory controller mounted.
    """
    if os.geteuid() != 0:
        raise PrivilegeError("prelock bench thrash must run as root: it creates a memory cgroup, "
                             "moves processes into it and starts the prelock daemon")
    controller = cgroupfs.memory_controller(mountinfo)
    if controller is None:
        raise PrivilegeError("no memory cgroup controller is mounted (neither a cgroup v1 memory "
                             "hierarchy nor cgroup2 with the memory controller): the bench needs one "
                             "to limit its workloads")
    _check_settings(settings)
    return controller


def _check_settings(settings: ThrashSettings) -> None:
    unknown = [mode for mode in settings.modes if mode not in MODES]
    if unknown or not settings.modes:
        raise ConfigError(f"invalid modes {','.join(settings.modes)!r}: choose from {', '.join(MODES)}")
    if "vmtouch" in settings.modes and shutil.which("vmtouch") is None:
        raise ConfigError("vmtouch is not installed (not found in PATH): install it or leave out the vmtouch mode")
    if settings.lock_scope not in LOCK_SCOPES:
        raise ConfigError(f"invalid lock scope {settings.lock_scope!r}: choose bench or machine")
    working_set_bytes = settings.critical_bytes + settings.hog_bytes
    if working_set_bytes >= settings.limit_bytes:
        raise ConfigError(f"the working sets ({format_size(working_set_bytes)}) must fit below the limit "
                          f"({format_size(settings.limit_bytes)}): raise --limit or lower the sizes")
    if min(settings.critical_bytes, settings.hog_bytes) < native.PAGE_SIZE:
        raise ConfigError(f"working-set sizes must be at least one page ({native.PAGE_SIZE} bytes)")
    if settings.leak_bytes < native.PAGE_SIZE:
        raise ConfigError(f"the hog must leak at least one page ({native.PAGE_SIZE} bytes) per pass, "
                          "or it never fills the cgroup")
    # A leak that does not fit beside the working sets fails its first allocation, and
    # the hog exits at once instead of filling the cgroup pass by pass.
    if working_set_bytes + settings.leak_bytes >= settings.limit_bytes:
        raise ConfigError(f"the leak per pass ({format_size(settings.leak_bytes)}) must fit below the limit "
                          f"with the working sets ({format_size(working_set_bytes)} of "
                          f"{format_size(settings.limit_bytes)}): lower --leak")
    # A NaN or infinite duration would never end the phase: comparisons with NaN are false.
    for name, seconds in (("max_seconds", settings.max_seconds), ("baseline_seconds", settings.baseline_seconds)):
        if not math.isfinite(seconds) or seconds <= 0:
            raise ConfigError(f"{name} must be a finite number of seconds above 0, got {seconds!r}")


def check_directory(directory: str, needed_bytes: int) -> None:
    """Raise ConfigError unless directory can hold evictable, executable-mappable bench files."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"cannot open the bench directory {directory}: {exc.strerror}; "
                          "pass an existing directory with --dir") from exc
    try:
        fs_name = MEMORY_FS_MAGICS.get(native.fstatfs_type(fd, directory))
        vfs = os.fstatvfs(fd)
    finally:
        os.close(fd)
    if fs_name is not None:
        raise ConfigError(f"{directory} is on {fs_name}, whose pages cannot be evicted without swap, so "
                          "nothing would thrash: pass --dir on a disk-backed filesystem")
    if vfs.f_flag & os.ST_NOEXEC:
        raise ConfigError(f"{directory} is mounted noexec, so the workloads cannot map their files "
                          "executable: pass --dir on another filesystem")
    free_bytes = vfs.f_bavail * vfs.f_frsize
    if free_bytes < needed_bytes:
        raise ConfigError(f"{directory} has {format_size(free_bytes)} free, the bench files need "
                          f"{format_size(needed_bytes)}: pass --dir with more space")


def write_bench_file(path: str, size_bytes: int) -> None:
    """Write size_bytes of random data to path, so every page must be read from disk.

    A sparse file would not do: the kernel fills pages of a hole without any I/O.
    """
    chunk_bytes = MiB
    with open(path, "wb") as f:
        remaining = size_bytes
        while remaining > 0:
            f.write(os.urandom(min(chunk_bytes, remaining)))
            remaining -= chunk_bytes
        f.flush()
        os.fsync(f.fileno())


def evict_file(path: str) -> int | None:
    """Drop path's clean pages from the page cache; return the pages still cached.

    Only pages that no process maps or locks are dropped. Returns None when the kernel has
    no cachestat(2) to count what remained.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not native.has_cachestat():
            return None
        return native.cachestat(fd, path=path).cache
    finally:
        os.close(fd)


def machine_description(controller: cgroupfs.MemoryController) -> dict:
    uname = os.uname()
    return {
        "kernel": uname.release,
        "cpus": os.cpu_count(),
        "mem_total_bytes": psutil.virtual_memory().total,
        "swap_total_bytes": psutil.swap_memory().total,
        "cgroup_version": controller.version,
    }


# Processes: the workloads inside the cgroup and the lockers outside it.

class Workload:
    """A started bench_workload process and what it has written so far."""

    def __init__(self, role: str, path: str, cgroup_dir: str, extra_args: list[str]):
        argv = [sys.executable, "-m", "prelock.bench_workload", role, path, "--cgroup", cgroup_dir, *extra_args]
        self.role = role
        self.heartbeats: list[tuple[float, float]] = []
        self.leaked_bytes = 0
        self.exited_at: float | None = None
        self.ready = threading.Event()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read_output, name=f"bench-{role}-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_output(self) -> None:
        for line in self.process.stdout:
            parsed = parse_workload_line(line)
            if parsed is None:
                log.debug("%s: unexpected output %r", self.role, line)
                continue
            kind, numbers = parsed
            if kind == "heartbeat":
                self.heartbeats.append((numbers[0], numbers[1]))
            elif kind == "pass":
                self.leaked_bytes = int(numbers[1])
            self.ready.set()
        # End of output means the process has exited, so wait() returns at once.
        self.process.wait()
        self.exited_at = time.monotonic()
        self.ready.set()

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, step: str) -> None:
        """Wait until condition() is true; raise PrelockError if the process exits or time runs out.

        step names what the workload is doing, such as "mapping its file", for the error.
        """
        deadline = time.monotonic() + timeout_s
        while not condition():
            if self.exited_at is not None:
                raise PrelockError(f"the {self.role} workload exited with status "
                                   f"{self.process.returncode} before {step}: {self.error_output()}")
            if time.monotonic() >= deadline:
                raise PrelockError(f"timed out after {timeout_s:.0f}s waiting for the {self.role} "
                                   f"workload to finish {step}")
            time.sleep(0.02)

    def error_output(self) -> str:
        if self.exited_at is None:
            return ""
        text = self.process.stderr.read().strip()
        return text.splitlines()[-1] if text else "no error output"

    def stop(self) -> None:
        # The workloads hold nothing that needs a clean exit.
        _kill(self.process, signal.SIGKILL, timeout_s=10.0)
        self._reader.join(timeout=5.0)


class Locker:
    """The prelock daemon or vmtouch, started outside the bench cgroup."""

    def __init__(self, kind: str, argv: list[str], log_path: str, state_dir: str | None = None):
        self.kind = kind
        self.log_path = log_path
        self.state_dir = state_dir
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def locked_bytes(self) -> int:
        if self.kind == "prelock":
            status = self._read_status()
            return int(status.get("locked_bytes", 0)) if status else 0
        try:
            with open(f"/proc/{self.process.pid}/smaps") as f:
                return parse_smaps_locked_rss(f.read())
        except (FileNotFoundError, ProcessLookupError):
            return 0

    def _read_status(self) -> dict | None:
        try:
            with open(os.path.join(self.state_dir, "status.json")) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def held_bytes(self, paths: list[str]) -> int:
        """Return the bytes of the given files that the locker holds."""
        if self.kind != "prelock":
            # vmtouch maps and locks nothing but the files on its command line.
            return self.locked_bytes()
        keys = {file_key(os.stat(path)) for path in paths}
        status = self._read_status() or {}
        return sum(int(held.get("locked_bytes", 0)) for held in status.get("files", [])
                   if (held.get("dev"), held.get("inode")) in keys)

    def wait_ready(self, paths: list[str], needed_bytes: int, timeout_s: float = _LOCKER_READY_TIMEOUT_S) -> None:
        """Wait until the locker holds needed_bytes of the given files."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = self.held_bytes(paths)
            if held >= needed_bytes:
                return
            if self.process.poll() is not None:
                raise PrelockError(f"{self.kind} exited with status {self.process.returncode} before it "
                                   f"locked the working set: {self.log_tail()}")
            if time.monotonic() >= deadline:
                raise PrelockError(f"timed out after {timeout_s:.0f}s waiting for {self.kind} to lock "
                                   f"{format_size(needed_bytes)} (it holds {format_size(held)}); the end "
                                   f"of its output: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                tail = f.read().strip().splitlines()[-lines:]
        except OSError:
            return "no log"
        return " | ".join(tail) if tail else "no output"

    def stop(self) -> None:
        # SIGTERM lets the daemon release its mappings and exit 0.
        _kill(self.process, signal.SIGTERM, timeout_s=15.0)


def start_prelock(mode: str, settings: ThrashSettings, workdir: str) -> Locker:
    state_dir = os.path.join(workdir, f"state-{mode}")
    config = daemon_config(mode, settings, state_dir, workdir)
    config_text = yaml.safe_dump(config, sort_keys=False)
    config_path = os.path.join(workdir, f"prelock-{mode}.yaml")
    # The generated config goes through the daemon's own validation before it starts.
    parse_config(config_text, config_path)
    with open(config_path, "w") as f:
        f.write(config_text)
    argv = [sys.executable, "-m", "prelock", "run", "-c", config_path]
    return Locker("prelock", argv, os.path.join(workdir, f"prelock-{mode}.log"), state_dir)


def start_vmtouch(paths: list[str], workdir: str) -> Locker:
    # Without -d, vmtouch -l stays in the foreground and holds the locks until a signal.
    argv = [shutil.which("vmtouch") or "vmtouch", "-l", *paths]
    return Locker("vmtouch", argv, os.path.join(workdir, "vmtouch.log"))


def _kill(process: subprocess.Popen, signum: int, timeout_s: float) -> None:
    """Send signum to a process this module started, then SIGKILL it after timeout_s."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signum)
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not exit %.0fs after %s, sending SIGKILL", process.pid, timeout_s,
                    signal.Signals(signum).name)
        process.kill()
        process.wait()


def sample_io(pid: int) -> tuple[int, int] | None:
    """Return (major faults, bytes read from disk) of pid, or None once it has exited."""
    try:
        major_faults = procfs.read_stat(pid).majflt
        read_bytes = psutil.Process(pid).io_counters().read_bytes
    except (ProcessGone, psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    return major_faults, read_bytes


# Phases: the idle baseline, then one run per mode, each in a fresh cgroup.

@dataclass
class BenchFiles:
    workdir: str
    critical_path: str
    hog_path: str

    def paths(self) -> list[str]:
        return [self.critical_path, self.hog_path]


@dataclass
class Phase:
    """A cgroup for one phase and the processes started for it."""

    controller: cgroupfs.MemoryController
    cgroup_path: str
    workloads: list[Workload] = field(default_factory=list)
    lockers: list[Locker] = field(default_factory=list)

    @property
    def cgroup_dir(self) -> str:
        return str(self.controller.directory(self.cgroup_path))

    def start_workload(self, role: str, path: str, extra_args: list[str]) -> Workload:
        workload = Workload(role, path, self.cgroup_dir, extra_args)
        self.workloads.append(workload)
        return workload

    def usage_bytes(self) -> int:
        memory = cgroupfs.read_memory(self.controller, self.cgroup_path)
        return memory.usage_bytes if memory else 0

    def stop_all(self) -> None:
        for process in [*self.workloads, *self.lockers]:
            try:
                process.stop()
            except OSError as exc:
                log.error("stopping pid %d failed: %s", process.process.pid, exc)


@contextlib.contextmanager
def run_phase(controller: cgroupfs.MemoryController, parent_path: str, name: str,
              settings: ThrashSettings, files: BenchFiles) -> Iterator[Phase]:
    """Create the phase's cgroup; afterwards stop its processes, remove it, evict the files."""
    cgroup_path = cgroupfs.create_memory_cgroup(controller, parent_path, f"{CGROUP_PREFIX}{os.getpid()}-{name}",
                                                settings.limit_bytes)
    log.debug("created cgroup %s limit=%s", cgroup_path, format_size(settings.limit_bytes))
    phase = Phase(controller, cgroup_path)
    try:
        yield phase
    finally:
        with _interrupts_deferred():
            phase.stop_all()
            _kill_leftovers(controller, cgroup_path)
            cgroupfs.remove_cgroup(controller, cgroup_path)
            log.debug("removed cgroup %s", cgroup_path)
            evict_bench_files(files)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM during the block, then raise KeyboardInterrupt if one came.

    A second Ctrl-C then cannot stop the cleanup halfway, and is not lost either.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    deferred = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum))
                for signum in deferred}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt


def _kill_leftovers(controller: cgroupfs.MemoryController, cgroup_path: str) -> None:
    # Only the bench's own workloads ever join its cgroup, but a process that was moved
    # in some other way would keep the cgroup from being removed.
    for pid in cgroupfs.list_processes(controller, cgroup_path):
        log.warning("killing pid %d, left in cgroup %s", pid, cgroup_path)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def evict_bench_files(files: BenchFiles) -> list[str]:
    """Evict the bench files; return a warning for each file that stayed partly cached."""
    warnings = []
    for path in files.paths():
        cached_pages = evict_file(path)
        size_pages = os.path.getsize(path) // native.PAGE_SIZE
        if cached_pages is not None and cached_pages > size_pages // 100:
            warnings.append(f"{cached_pages * native.PAGE_SIZE // MiB} MiB of {os.path.basename(path)} stayed "
                            "cached after eviction: another process maps or locks it")
    return warnings


@contextlib.contextmanager
def bench_files(settings: ThrashSettings) -> Iterator[BenchFiles]:
    """Create the bench's working directory and its two files; remove them afterwards."""
    base_dir = settings.directory or tempfile.gettempdir()
    check_directory(base_dir, settings.critical_bytes + settings.hog_bytes + 16 * MiB)
    with tempfile.TemporaryDirectory(prefix=CGROUP_PREFIX, dir=base_dir) as workdir:
        files = BenchFiles(workdir, os.path.join(workdir, "critical.data"), os.path.join(workdir, "hog.code"))
        write_bench_file(files.critical_path, settings.critical_bytes)
        write_bench_file(files.hog_path, settings.hog_bytes)
        evict_bench_files(files)
        yield files


def parent_cgroup(controller: cgroupfs.MemoryController) -> str:
    """Return where the bench creates its cgroups.

    v1: below this process's own memory cgroup, so the bench stays inside whatever
    contains it. v2: below the root, because a v2 cgroup that contains processes cannot
    give its children the memory controller.
    """
    if controller.version == 2:
        return "/"
    return procfs.memory_cgroup_path(procfs.read_cgroup(os.getpid()))


def remove_stale_cgroups(controller: cgroupfs.MemoryController, parent_path: str) -> None:
    """Remove empty cgroups left by a bench run whose process no longer exists."""
    pattern = re.compile(re.escape(CGROUP_PREFIX) + r"(\d+)-")
    try:
        names = os.listdir(controller.directory(parent_path))
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match is None or psutil.pid_exists(int(match.group(1))):
            continue
        path = f"{parent_path.rstrip('/')}/{name}"
        try:
            cgroupfs.remove_cgroup(controller, path, timeout_s=0)
            log.info("removed stale cgroup %s", path)
        except OSError as exc:
            log.warning("cannot remove stale cgroup %s: %s", path, exc.strerror)


def run_thrash(settings: ThrashSettings, on_progress: ProgressCallback | None = None) -> ThrashReport:
    """Run the idle baseline and then each mode; always remove cgroups, files and processes."""
    controller = check_can_run(settings)
    parent_path = parent_cgroup(controller)
    remove_stale_cgroups(controller, parent_path)
    report = ThrashReport(settings, machine_description(controller))
    progress = on_progress or (lambda _update: None)

    with bench_files(settings) as files:
        try:
            report.baseline = run_baseline(controller, parent_path, settings, files, progress)
            for mode in settings.modes:
                report.modes.append(run_mode(mode, controller, parent_path, settings, files, progress))
        except PermissionError as exc:
            raise PrivilegeError(f"cannot set up the bench cgroup: {exc}") from exc
    return report


def run_baseline(controller: cgroupfs.MemoryController, parent_path: str, settings: ThrashSettings,
                 files: BenchFiles, progress: ProgressCallback) -> HeartbeatStats:
    """Measure the critical process's heartbeats with its working set cached and no hog."""
    with run_phase(controller, parent_path, "baseline", settings, files) as phase:
        critical = _start_critical(phase, settings, files)
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < settings.baseline_seconds:
            progress(Progress("baseline", elapsed, settings.baseline_seconds, phase.usage_bytes(),
                              _last_duration(critical), 0, False))
            time.sleep(_TICK_S)
        durations = [duration for start, duration in critical.heartbeats if start >= started]
    return summarize_heartbeats(durations)


def run_mode(mode: str, controller: cgroupfs.MemoryController, parent_path: str, settings: ThrashSettings,
             files: BenchFiles, progress: ProgressCallback) -> ModeResult:
    warnings = evict_bench_files(files)
    with run_phase(controller, parent_path, mode, settings, files) as phase:
        critical = _start_critical(phase, settings, files)
        if mode != "none":
            locker, paths = _start_locker(mode, settings, files)
            phase.lockers.append(locker)
            locker.wait_ready(paths, sum(os.path.getsize(path) for path in paths))
        counters_before = sample_io(critical.pid) or (0, 0)

        hog = phase.start_workload("hog", files.hog_path, _hog_args(settings))
        hog.wait_until(hog.ready.is_set, _WORKLOAD_READY_TIMEOUT_S, "mapping its file")
        watch = _watch_mode(mode, phase, critical, hog, settings, progress)

        memory = cgroupfs.read_memory(controller, phase.cgroup_path)
        oom_kills = (memory.oom_kills or 0) if memory else 0
        hog_returncode = hog.process.poll()
        critical_alive = critical.process.poll() is None
    # The processes are stopped now, so the hog's reader has seen all of its output.

    outcome = hog_outcome(hog_returncode, oom_kills)
    hog_end = (hog.exited_at if hog.exited_at is not None and hog_returncode is not None
               else watch.stopped_at) - hog.started_at
    counters_after = watch.last_counters or counters_before
    if mode == "none" and watch.max_unevictable_bytes > 8 * MiB:
        warnings.append(f"{format_size(watch.max_unevictable_bytes)} of the bench cgroup was unevictable with "
                        "no locker running: another process locked the bench files")
    if not critical_alive:
        warnings.append("the critical process died during the mode")

    return ModeResult(
        mode=mode,
        hog_killed=outcome == "oom-killed",
        hog_end_s=hog_end,
        hog_exit=outcome,
        critical_alive=critical_alive,
        heartbeat=summarize_heartbeats(_durations_between(critical, hog.started_at, hog.started_at + hog_end)),
        critical_major_faults=counters_after[0] - counters_before[0],
        critical_read_bytes=counters_after[1] - counters_before[1],
        locked_bytes=watch.max_locked_bytes,
        oom_kills=oom_kills,
        hog_leaked_bytes=hog.leaked_bytes,
        samples=[(start - hog.started_at, duration) for start, duration in critical.heartbeats
                 if start >= hog.started_at],
        warnings=warnings,
    )


@dataclass
class _Watch:
    stopped_at: float = 0.0
    last_counters: tuple[int, int] | None = None
    max_locked_bytes: int = 0
    max_unevictable_bytes: int = 0


def _watch_mode(mode: str, phase: Phase, critical: Workload, hog: Workload, settings: ThrashSettings,
                progress: ProgressCallback) -> _Watch:
    """Sample the mode until max_seconds pass, or after_kill_s after the hog died."""
    watch = _Watch()
    while True:
        now = time.monotonic()
        elapsed = now - hog.started_at
        hog_dead = hog.exited_at is not None
        if elapsed >= settings.max_seconds or (hog_dead and now - hog.exited_at >= settings.after_kill_s):
            watch.stopped_at = now
            return watch

        watch.last_counters = sample_io(critical.pid) or watch.last_counters
        for locker in phase.lockers:
            watch.max_locked_bytes = max(watch.max_locked_bytes, locker.locked_bytes())
        memory = cgroupfs.read_memory(phase.controller, phase.cgroup_path)
        if memory is not None:
            unevictable = memory.stat.get("unevictable", 0)
            watch.max_unevictable_bytes = max(watch.max_unevictable_bytes, unevictable)
        progress(Progress(mode, elapsed, settings.max_seconds, memory.usage_bytes if memory else 0,
                          _last_duration(critical), hog.leaked_bytes, not hog_dead))
        time.sleep(_TICK_S)


def _start_critical(phase: Phase, settings: ThrashSettings, files: BenchFiles) -> Workload:
    """Start the critical workload and wait for its first pass, which faults its working set in."""
    critical = phase.start_workload("critical", files.critical_path,
                                    ["--interval-ms", f"{settings.heartbeat_interval_s * 1000:g}"])
    critical.wait_until(lambda: bool(critical.heartbeats), _FIRST_HEARTBEAT_TIMEOUT_S,
                        "reading its working set once")
    return critical


def _start_locker(mode: str, settings: ThrashSettings, files: BenchFiles) -> tuple[Locker, list[str]]:
    """Start the mode's locker; return it and the files it must hold before the hog starts.

    vmtouch locks both files whole. The daemon locks what targets have mapped, and only
    the critical process runs yet.
    """
    if mode == "vmtouch":
        return start_vmtouch(files.paths(), files.workdir), files.paths()
    return start_prelock(mode, settings, files.workdir), [files.critical_path]


def _hog_args(settings: ThrashSettings) -> list[str]:
    # A positive oom_score_adj, as a pod of the Burstable QoS class gets, makes the OOM
    # killer choose the hog over the critical process when their sizes are close.
    return ["--leak-bytes", str(settings.leak_bytes), "--touch-pages", str(settings.hog_touch_pages),
            "--pause-ms", f"{settings.hog_pause_s * 1000:g}", "--oom-score-adj", "500"]


def _last_duration(workload: Workload) -> float | None:
    return workload.heartbeats[-1][1] if workload.heartbeats else None


def _durations_between(workload: Workload, start: float, end: float) -> list[float]:
    return [duration for started, duration in workload.heartbeats if start <= started < end]
