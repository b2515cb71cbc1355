"""The daemon: start checks, the scan-plan-apply cycle, signals, status and readiness."""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from prelock import native, privilege, snapshot, state
from prelock.cache_render import printable
from prelock.config import Config, load_config
from prelock.errors import ConfigError, PrivilegeError
from prelock.files import FileKey
from prelock.locker import REASON_STOPPING, Locker
from prelock.plan import TIERS, MemoryState, Plan, budget_bytes
from prelock.scan import ScanResult, own_cgroup_limit_bytes, scan_and_plan
from prelock.sysmem import read_meminfo
from prelock.units import format_size

log = logging.getLogger("prelock.daemon")

STATUS_FILE = "status.json"


@dataclass
class CycleSummary:
    number: int
    duration_s: float
    plan: Plan
    scan: ScanResult
    locked_new: int = 0
    grown: int = 0
    released: int = 0
    skipped: int = 0
    memlock_limited: bool = False


@dataclass
class Daemon:
    config: Config
    config_path: str | None
    proc_root: str = "/proc"
    locker: Locker = field(default_factory=Locker)
    # Monotonic time at which a target last mapped each held file, for lock.linger.
    last_mapped: dict[FileKey, float] = field(default_factory=dict)
    warned: set[tuple[FileKey | str, str]] = field(default_factory=set)
    cycles: int = 0
    started_at: float = field(default_factory=time.time)
    metrics: object | None = None
    last_summary: CycleSummary | None = None
    # Set by SIGTERM and SIGINT, so a long apply stops between two files.
    stopping: bool = False
    # The --log-level given on the command line, which a reloaded log_level must not override.
    log_level_override: str | None = None
    _snapshot_signature: tuple = ()
    _denied_warned: bool = False
    _warned_this_cycle: set = field(default_factory=set)
    _started_config: Config | None = None

    def __post_init__(self) -> None:
        self._started_config = self.config

    def cycle(self) -> CycleSummary:
        """Scan, plan, release what left the plan, then lock what is new in it."""
        started = time.monotonic()
        self.cycles += 1

        # A truncate drops locked pages silently, so measure before planning.
        self.locker.refresh_locked()
        plan, scan = scan_and_plan(self.config, self.proc_root, self.locker.total_locked_bytes())
        now = time.monotonic()
        for key in scan.files:
            self.last_mapped[key] = now
        # Releasing first frees budget for the files the plan ranks higher.
        released = self._release_unplanned(plan, scan, now)
        report = self.locker.apply(plan.files, plan.budget_bytes, should_stop=lambda: self.stopping)
        self._warn_denied(scan)

        summary = CycleSummary(self.cycles, time.monotonic() - started, plan, scan,
                               locked_new=len(report.locked), grown=len(report.grown), released=released,
                               skipped=len(plan.skipped) + len(report.skipped),
                               memlock_limited=report.memlock_limited)
        self._warn_once(plan, report)
        self._log_summary(summary)
        self.last_summary = summary
        self._forget_gone_files()
        return summary

    def _forget_gone_files(self) -> None:
        # Files come and go for months; what the daemon remembers about them must not grow
        # with every file it ever saw. Only held files need a last-mapped time, and a file
        # skipped in this cycle keeps its warned mark, so it is warned about once.
        self.last_mapped = {key: seen for key, seen in self.last_mapped.items() if key in self.locker.held}
        self.warned &= self._warned_this_cycle | {w for w in self.warned if isinstance(w[0], str)}
        self._warned_this_cycle = set()

    def _release_unplanned(self, plan: Plan, scan: ScanResult, now: float) -> int:
        planned_keys = {planned.key for planned in plan.files}
        linger_s = self.config.lock.linger_s
        released = 0
        for key, held in list(self.locker.held.items()):
            if key in planned_keys:
                continue
            if key in scan.files:
                # Still mapped, but out of the plan: over budget, or excluded by a reloaded config.
                reason = "left the plan"
            elif _held_file_unlinked(held.addr, held.length_bytes):
                # An upgrade by rename or a delete leaves the old inode with no links: holding
                # it pins its page cache and disk blocks, so it goes without waiting for linger.
                reason = "unlinked"
            elif now - self.last_mapped.get(key, now) >= linger_s:
                reason = "linger expired"
            else:
                continue
            self.locker.release(key)
            self.last_mapped.pop(key, None)
            released += 1
            log.debug("released %s reason=%s", held.path, reason)
        return released

    def _warn_once(self, plan: Plan, report) -> None:
        for skipped in plan.skipped:
            self._warn(skipped.key or skipped.path, skipped.path, skipped.reason)
        for key, path, reason in report.skipped:
            self._warn(key, path, reason)
        for key, path in report.changed:
            log.info("file changed while locked, re-checked next cycle: %s", printable(path))
        if report.memlock_limited:
            self._warn("memlock", "RLIMIT_MEMLOCK", "limit reached: grant CAP_IPC_LOCK or raise "
                       "LimitMEMLOCK (systemd) / ulimit -l to lock more")

    def _warn_denied(self, scan: ScanResult) -> None:
        if scan.processes_denied and not self._denied_warned:
            self._denied_warned = True
            log.warning("%d processes could not be read (access denied): their code is not locked; the "
                        "daemon needs root with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, and a sandbox or "
                        "Yama ptrace policy can deny some processes even then", scan.processes_denied)

    def _warn(self, subject: FileKey | str, path: str, reason: str) -> None:
        # Skip reasons that are not a problem (tmpfs, devices) stay at debug level.
        if reason in _ROUTINE_SKIPS:
            log.debug("skipped %s: %s", path, reason)
            return
        self._warned_this_cycle.add((subject, reason))
        if (subject, reason) in self.warned:
            return
        self.warned.add((subject, reason))
        # Any local user chooses file names: escaped, a newline cannot forge a log line.
        log.warning("skipped %s: %s", printable(path), reason)

    def _log_summary(self, summary: CycleSummary) -> None:
        by_tier = self.locker.locked_bytes_by_tier()
        tiers = " ".join(f"{tier}={format_size(by_tier.get(tier, 0))}" for tier in TIERS)
        log.info("cycle %d: held files=%d %s total=%s budget=%s targets=%d new=%d grown=%d released=%d "
                 "skipped=%d duration=%.2fs", summary.number, len(self.locker.held), tiers,
                 format_size(self.locker.total_locked_bytes()), format_size(summary.plan.budget_bytes),
                 sum(summary.plan.targets.values()), summary.locked_new, summary.grown, summary.released,
                 summary.skipped, summary.duration_s)

    def restore_snapshot(self) -> None:
        """Lock the unchanged files of the last snapshot before the first scan."""
        planned = snapshot.planned_files(snapshot.read_snapshot(self.config.state_dir), self.config)
        if not planned:
            return
        meminfo = read_meminfo(self.proc_root)
        memory = MemoryState(meminfo["MemTotal"], meminfo.get("MemAvailable", 0),
                             cgroup_limit_bytes=own_cgroup_limit_bytes())
        self.locker.apply(planned, budget_bytes(self.config, memory))
        # Restored files wait up to lock.linger for their targets to start.
        now = time.monotonic()
        for key in self.locker.held:
            self.last_mapped[key] = now
        log.info("restored from snapshot: files=%d/%d size=%s", len(self.locker.held), len(planned),
                 format_size(self.locker.total_locked_bytes()))

    def write_snapshot(self) -> None:
        """Persist the held set when it changed since the last write."""
        signature = tuple(sorted((key, held.extents) for key, held in self.locker.held.items()))
        if signature == self._snapshot_signature:
            return
        entries = [e for e in map(snapshot.entry_for_held, self.locker.held.values()) if e is not None]
        try:
            snapshot.write_snapshot(self.config.state_dir, entries)
        except OSError as exc:
            self._warn_state_write(snapshot.SNAPSHOT_FILE, exc)
            return
        self._snapshot_signature = signature

    def status_record(self) -> dict:
        """Return the files the daemon keeps locked now, for the status file and `prelock status`."""
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "cycles": self.cycles,
            "config": self.config_path,
            "mode": self.config.lock.mode,
            "locked_bytes": self.locker.total_locked_bytes(),
            "locked_bytes_by_tier": self.locker.locked_bytes_by_tier(),
            "files": [
                {"path": held.path, "tier": held.tier, "dev": key[0], "inode": key[1],
                 "locked_bytes": held.locked_bytes, "address": held.addr, "length_bytes": held.length_bytes,
                 "processes": [{"pid": pid, "comm": comm} for pid, comm in held.owners]}
                for key, held in self.locker.held.items()
            ],
        }

    def write_status(self, running: bool = True) -> None:
        record = self.status_record()
        record["running"] = running
        try:
            state.write_json(Path(self.config.state_dir) / STATUS_FILE, record)
        except OSError as exc:
            self._warn_state_write(STATUS_FILE, exc)

    def _warn_state_write(self, name: str, exc: OSError) -> None:
        if ("state", name) in self.warned:
            return
        self.warned.add(("state", name))
        log.warning("cannot write %s in state_dir %s: %s (locking goes on)", name, self.config.state_dir,
                    exc.strerror or exc)

    def reload(self) -> None:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            # One line per problem, because journald stores each line as its own entry.
            for problem in getattr(exc, "problems", None) or [exc]:
                log.error("reload failed, keeping the running config: %s", problem)
            return
        except Exception as exc:  # noqa: BLE001 - a failed reload must never stop the daemon
            log.error("reload failed, keeping the running config: %s: %s", type(exc).__name__, exc)
            return
        # The metrics server started with the first config and keeps its address.
        serving = self._started_config.metrics.listen or ""
        if (config.metrics.listen or "") != serving:
            log.warning("metrics.listen is %r in the new config but %r is in force: restart prelock to "
                        "apply it", config.metrics.listen or "", serving)
            config = dataclasses.replace(config, metrics=self._started_config.metrics)
        if self.log_level_override is None and config.log_level != self.config.log_level:
            logging.getLogger().setLevel(config.log_level.upper())
        if Path(config.state_dir) != Path(self.config.state_dir):
            # The running daemon holds the lock of its state_dir.
            log.warning("state_dir changed from %s to %s: restart prelock to apply it",
                        self.config.state_dir, config.state_dir)
            config = dataclasses.replace(config, state_dir=self.config.state_dir)
        self.config = config
        self.warned.clear()
        log.info("reloaded config from %s", config.source)


_ROUTINE_SKIPS = {"not a file mapping", "in-memory or device file", "on tmpfs", "on ramfs", "on hugetlbfs",
                  REASON_STOPPING}


def _held_file_unlinked(addr: int, length_bytes: int) -> bool:
    link = f"/proc/self/map_files/{addr:x}-{addr + length_bytes:x}"
    try:
        return os.stat(link).st_nlink == 0
    except PermissionError:
        # Following map_files links needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, but
        # reading the link does not, and the kernel marks an unlinked file in it.
        pass
    except OSError:
        return False
    try:
        return os.readlink(link).endswith(" (deleted)")
    except OSError:
        return False


def check_privilege() -> privilege.Privilege:
    """Raise PrivilegeError when this process cannot lock anything useful."""
    current = privilege.current()
    if current.can_lock_unlimited:
        return current
    if current.memlock_limit_bytes < privilege.MIN_MEMLOCK_BYTES:
        raise PrivilegeError(
            f"RLIMIT_MEMLOCK is {format_size(current.memlock_limit_bytes)} and CAP_IPC_LOCK is missing: "
            "run as root with CAP_IPC_LOCK (systemd: AmbientCapabilities=CAP_IPC_LOCK, Kubernetes: "
            "capabilities.add: [IPC_LOCK]) or raise the limit (LimitMEMLOCK=infinity, ulimit -l unlimited)")
    log.warning("CAP_IPC_LOCK is missing: locking at most RLIMIT_MEMLOCK=%s, and the daemon's own "
                "pages stay unlocked", format_size(current.memlock_limit_bytes))
    return current


def lock_own_pages(current: privilege.Privilege) -> None:
    """Lock the daemon's own pages so it keeps running under the pressure it guards against.

    MCL_ONFAULT matters: without it every later mmap is populated whole at map time and
    thread stacks are fully populated.
    """
    if not current.can_lock_unlimited:
        # mlockall(MCL_CURRENT) needs the whole address space within RLIMIT_MEMLOCK, and
        # MCL_FUTURE would make every later mmap, malloc arenas included, count against it.
        return
    native.mlockall(native.MCL_CURRENT | native.MCL_FUTURE | native.MCL_ONFAULT)


def sd_notify(message: str) -> None:
    """Send message to systemd's NOTIFY_SOCKET when the daemon runs under Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], exc)


def run(daemon: Daemon, max_cycles: int | None = None, restore: bool = True) -> None:
    """Restore the snapshot, then run cycles every scan.interval until SIGTERM or SIGINT.

    SIGHUP reloads the config. The handlers are in place before the restore, which can
    take seconds from a cold cache, so no signal finds the default action.
    """
    wake_read, wake_write = socket.socketpair()
    wake_read.setblocking(False)
    wake_write.setblocking(False)
    pending: list[int] = []

    def on_signal(signum, _frame) -> None:
        pending.append(signum)
        if signum in (signal.SIGTERM, signal.SIGINT):
            daemon.stopping = True

    previous_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)

    try:
        # A status file written before the restore lets `prelock status` see this daemon running.
        daemon.write_status()
        if restore:
            daemon.restore_snapshot()
        _loop(daemon, pending, wake_read, max_cycles)
    finally:
        sd_notify("STOPPING=1")
        daemon.locker.release_all()
        daemon.write_status(running=False)
        signal.set_wakeup_fd(previous_fd)
        wake_read.close()
        wake_write.close()
        log.info("stopped: released every locked file")


def _loop(daemon: Daemon, pending: list[int], wake: socket.socket, max_cycles: int | None) -> None:
    next_cycle = time.monotonic()
    while True:
        while pending:
            signum = pending.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s, stopping", signal.Signals(signum).name)
                return
            sd_notify("RELOADING=1")
            daemon.reload()
            sd_notify("READY=1")
            next_cycle = time.monotonic()

        if daemon.stopping:
            return
        if time.monotonic() >= next_cycle:
            daemon.cycle()
            daemon.write_status()
            daemon.write_snapshot()
            if daemon.metrics is not None:
                daemon.metrics.update(daemon)
            if daemon.cycles == 1:
                sd_notify("READY=1")
            sd_notify(f"STATUS=holding {len(daemon.locker.held)} files, "
                      f"{format_size(daemon.locker.total_locked_bytes())}")
            if max_cycles is not None and daemon.cycles >= max_cycles:
                return
            next_cycle = time.monotonic() + daemon.config.scan.interval_s

        timeout_s = max(next_cycle - time.monotonic(), 0)
        if not pending:
            select.select([wake], [], [], timeout_s)
        _drain(wake)


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(64):
            pass
    except BlockingIOError:
        pass
