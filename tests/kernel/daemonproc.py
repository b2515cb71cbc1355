"""Run `prelock run` as a subprocess for kernel tests, and read what it holds.

The daemon logs to a file in the test's work directory and writes status.json to
its state_dir after every cycle; `DaemonProcess.wait_for_cycle` polls that file.
What the daemon has locked is read from the kernel, not from the daemon: the test
reads the daemon's /proc/PID/maps and pagemap and looks up PG_mlocked in
/proc/kpageflags for each page.

Every test config made here selects only programs under the work directory's bin/
by executable path, with `others: false` and no critical names, so a test daemon
never locks a process that the test did not start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import pagecheck
import procs

PAGE_SIZE = pagecheck.PAGE_SIZE
PFN_MASK = pagecheck.PFN_MASK
PRESENT = pagecheck.PRESENT

PRELOCK_RUN = (sys.executable, "-m", "prelock.cli", "--log-level", "debug", "run")

# Files on tmpfs are skipped by the daemon by design, so test files live on disk.
WORK_PARENT = Path("/var/tmp")

# SIGTERM must end the daemon within this bound; it is the only timed assertion.
STOP_TIMEOUT_S = 5.0
# Generous bounds for waits that only guard against a hung daemon, not timing checks.
CYCLE_TIMEOUT_S = 60.0
POLL_INTERVAL_S = 0.05

C_SOURCE_DIR = Path(__file__).parent

FileKey = tuple[int, int]  # (st_dev, st_ino)


# --- work directory, files and programs ----------------------------------------------


@contextlib.contextmanager
def work_dir(prefix: str = "prelock-daemon-") -> Iterator[Path]:
    """Create a directory on disk under /var/tmp for one test and remove it afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=WORK_PARENT))
    try:
        (path / "bin").mkdir()
        (path / "data").mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_file(path: Path, size_bytes: int) -> Path:
    """Write size_bytes of random data to path and return path."""
    with open(path, "wb") as f:
        f.write(os.urandom(size_bytes))
    return path


def file_key(path: Path) -> FileKey:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def build_program(work: Path, source_name: str, program_name: str,
                  extra_cflags: Sequence[str] = ()) -> Path:
    """Compile C_SOURCE_DIR/source_name into work/bin/program_name.

    The program runs from the work directory, so the test config's executable glob
    selects it and nothing else.
    """
    source = (C_SOURCE_DIR / source_name).read_text()
    return procs.build_c_program(source, program_name, work / "bin",
                                 cflags=("-O2", "-Wall", "-Wextra", *extra_cflags))


def build_map_program(work: Path, program_name: str = "pld-map") -> Path:
    """Compile procs' map_file program under a name of its own in work/bin.

    `PROGRAM [-x] [-n] FILE` maps FILE privately, touches every page unless -n, prints
    "ready" and waits. A name other than map_file keeps configs of other tests that
    select map_file by name away from this test's processes.
    """
    return procs.build_c_program(procs.MAP_FILE_SOURCE, program_name, work / "bin")


# --- configuration ----------------------------------------------------------------


def restricted_config(work: Path) -> dict:
    """Return a config that targets only programs in work/bin and locks only files in work.

    Tests change the returned dict before passing it to `run_daemon`.
    """
    return {
        "critical": {"names": [], "exe": [f"{work}/bin/*"], "cgroups": []},
        "others": False,
        "files": {"include": ["^" + re.escape(str(work)) + "/"], "kinds": "code"},
        "lock": {"mode": "working-set", "budget": "256MiB", "min_available": "1%", "linger": "10m"},
        "scan": {"interval": "1s"},
        "state_dir": str(work / "state"),
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the daemon process -----------------------------------------------------------


@dataclass
class DaemonProcess:
    """A running `prelock run` started by `run_daemon`."""

    popen: subprocess.Popen
    config_path: Path
    state_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def status(self) -> dict | None:
        """Return this daemon's last status.json, or None before its first cycle."""
        try:
            record = json.loads((self.state_dir / "status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return record if record.get("pid") == self.pid else None

    def cycles(self) -> int:
        status = self.status()
        return 0 if status is None else status["cycles"]

    def wait_for_cycle(self, number: int, timeout_s: float = CYCLE_TIMEOUT_S) -> dict:
        """Wait until status.json reports cycle `number` or later; return that status.

        Fails the test with the end of the daemon's log when the daemon exits or stops
        cycling, so a hang shows up as a failure and not as a stuck test.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status is not None and status["cycles"] >= number:
                return status
            if self.popen.poll() is not None:
                raise AssertionError(f"daemon exited with status {self.popen.returncode} before cycle "
                                     f"{number}; log:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"daemon did not reach cycle {number} within {timeout_s:.0f} s "
                                     f"(at cycle {self.cycles()}); log:\n{self.log_tail()}")
            time.sleep(POLL_INTERVAL_S)

    def wait_for_more_cycles(self, count: int = 1) -> dict:
        """Wait for `count` cycles that start after this call; return the last status."""
        # The cycle running now may have scanned before the caller's last change, so it
        # does not count.
        return self.wait_for_cycle(self.cycles() + count + 1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def lines(self, level: str) -> list[str]:
        """Return the log lines of one level, such as "WARNING" or "ERROR"."""
        return [line for line in self.log().splitlines() if line.startswith(level + " ")]

    def problems(self) -> list[str]:
        """Return ERROR lines and Python tracebacks from the log."""
        return [line for line in self.log().splitlines()
                if line.startswith(("ERROR ", "CRITICAL ", "Traceback"))]

    def reload(self) -> None:
        self.popen.send_signal(signal.SIGHUP)

    def is_running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Send SIGTERM and return the exit status; fail if it takes longer than timeout_s."""
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"daemon still running {timeout_s:.0f} s after SIGTERM; "
                                 f"log:\n{self.log_tail()}") from None


@contextlib.contextmanager
def run_daemon(work: Path, config: dict, *, prefix: Sequence[str] = (), cycles: int | None = None,
               name: str = "daemon") -> Iterator[DaemonProcess]:
    """Start `prelock run` with config and end it by PID when the block exits.

    prefix is a command that execs the daemon, such as setpriv or prlimit, so the PID
    started is the daemon's own.
    """
    config_path = write_config(work / f"{name}.yaml", config)
    log_path = work / f"{name}.log"
    argv = [*prefix, *PRELOCK_RUN, "-c", str(config_path)]
    if cycles is not None:
        argv += ["--cycles", str(cycles)]
    with open(log_path, "wb") as log, procs.spawn(argv, stdout=log, stderr=log) as spawned:
        yield DaemonProcess(spawned.popen, config_path, Path(config["state_dir"]), log_path)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found: install util-linux, which provides it")
    return path


# --- kernel views of a process ----------------------------------------------------


def mappings_of(pid: int, key: FileKey) -> list[tuple[int, int]]:
    """Return the (start, end) addresses of pid's mappings of the file with key."""
    dev, inode = key
    ranges = []
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            fields = line.split(None, 5)
            major, minor = (int(x, 16) for x in fields[3].split(b":"))
            if int(fields[4]) == inode and os.makedev(major, minor) == dev:
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                ranges.append((start, end))
    return ranges


def maps_file(pid: int, key: FileKey) -> bool:
    """Whether pid has any mapping of the file with key."""
    return bool(mappings_of(pid, key))


def mlocked_pages(pid: int, start: int, end: int) -> tuple[int, int]:
    """Return (mlocked, present) page counts in pid's address range [start, end)."""
    pfns = [entry & PFN_MASK for entry in pagecheck.pagemap_entries(pid, start, end)
            if entry & PRESENT and entry & PFN_MASK]
    return pagecheck.count_mlocked(pfns), len(pfns)


def file_mlocked_pages(pid: int, key: FileKey) -> tuple[int, int]:
    """Return (mlocked, present) page counts over all of pid's mappings of the file."""
    locked = present = 0
    for start, end in mappings_of(pid, key):
        more_locked, more_present = mlocked_pages(pid, start, end)
        locked += more_locked
        present += more_present
    return locked, present


def held_mlocked_bytes(daemon_pid: int, status: dict) -> int:
    """Return the bytes PG_mlocked in the daemon's mappings at the addresses in status."""
    pages = 0
    for record in status["files"]:
        locked, _present = mlocked_pages(daemon_pid, record["address"],
                                         record["address"] + record["length_bytes"])
        pages += locked
    return pages * PAGE_SIZE


def file_pages(path: Path) -> int:
    return -(-os.stat(path).st_size // PAGE_SIZE)


@dataclass(frozen=True)
class Footprint:
    """What a process costs the machine, read from /proc/PID."""

    rss_anon_bytes: int
    open_fds: int
    vmas: int


def read_footprint(pid: int) -> Footprint:
    rss_anon_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                rss_anon_kib = int(line.split()[1])
    with open(f"/proc/{pid}/maps", "rb") as f:
        vmas = f.read().count(b"\n")
    return Footprint(rss_anon_kib * 1024, len(os.listdir(f"/proc/{pid}/fd")), vmas)
