"""Start real processes for kernel tests and end them by PID.

Every process started here is ended at teardown by its PID: SIGTERM, a wait, then
SIGKILL after a grace period. Descendants that a process forked (an sshd connection
handler, a shell's child) are collected before the parent is signalled and ended the
same way, so a test leaves no process behind. Network use is limited to 127.0.0.1.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD_EXE = Path("/usr/sbin/sshd")
SSH_KEYGEN_EXE = Path("/usr/bin/ssh-keygen")
CONTAINERD_EXE = Path("/usr/bin/containerd")
GCC_EXE = "gcc"

# sshd exits at start when its privilege separation directory is missing.
SSHD_PRIVSEP_DIR = Path("/run/sshd")

TERMINATE_GRACE_S = 5.0
START_TIMEOUT_S = 20.0
LOG_TAIL_BYTES = 4000


class ProcessStartError(RuntimeError):
    """A test process exited or did not become ready in time."""


@dataclass(frozen=True)
class SpawnedProcess:
    """A process started by `spawn`. Its `popen` stays usable to read the output."""

    pid: int
    argv: tuple[str, ...]
    popen: subprocess.Popen


@dataclass(frozen=True)
class SshdProcess:
    pid: int
    port: int
    exe: Path
    config_path: Path
    log_path: Path


@dataclass(frozen=True)
class ContainerdProcess:
    pid: int
    socket: Path
    exe: Path
    config_path: Path
    log_path: Path


# --- ending processes -------------------------------------------------------------


def list_descendants(pid: int) -> list[psutil.Process]:
    """Return the live descendants of `pid`, deepest first, or [] when `pid` has exited."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return list(reversed(children))


def end_process(popen: subprocess.Popen, grace_s: float = TERMINATE_GRACE_S) -> None:
    """End a process started by this module and every descendant it forked.

    Each process gets SIGTERM, then SIGKILL if it is still alive after `grace_s`.
    The parent is reaped through `popen`, so its PID is never signalled after reuse.
    """
    descendants = list_descendants(popen.pid)

    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()

    for process in descendants:
        end_descendant(process, grace_s)


def end_descendant(process: psutil.Process, grace_s: float) -> None:
    # psutil checks the process creation time before signalling, so a PID that was
    # reused by an unrelated process in the meantime is not signalled.
    try:
        process.terminate()
        process.wait(timeout=grace_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
            process.wait(timeout=grace_s)


# --- spawning ---------------------------------------------------------------------


def wait_for_line(popen: subprocess.Popen, expected: str, timeout_s: float) -> None:
    """Read stdout until a line equals `expected`, and raise if the process exits first.

    Reads the pipe's file descriptor directly, because select() cannot see lines that
    a buffered reader has already pulled in. Output after the expected line is dropped.
    """
    deadline = time.monotonic() + timeout_s
    fd = popen.stdout.fileno()
    pending = b""
    while True:
        remaining_s = deadline - time.monotonic()
        if remaining_s <= 0:
            raise ProcessStartError(
                f"{popen.args[0]}: no {expected!r} line on stdout within {timeout_s:.0f} s")
        readable, _, _ = select.select([fd], [], [], remaining_s)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise ProcessStartError(
                f"{popen.args[0]}: exited with status {popen.wait()} before printing {expected!r}")
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if expected.encode() in lines:
            return


@contextlib.contextmanager
def spawn(argv: Sequence[str | os.PathLike], *, ready_line: str | None = None,
          timeout_s: float = START_TIMEOUT_S, stdout=None, stderr=None,
          **popen_kwargs) -> Iterator[SpawnedProcess]:
    """Start `argv`, optionally wait for a `ready_line` on its stdout, and end it on exit.

    With `ready_line`, stdout is a pipe that stays open after the line is read.
    A process that writes more than a pipe buffer (64 KiB on Linux) after that blocks
    unless the test reads `popen.stdout`.
    """
    argv = tuple(os.fspath(arg) for arg in argv)
    if ready_line is not None:
        stdout = subprocess.PIPE
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                             **popen_kwargs)
    try:
        if ready_line is not None:
            wait_for_line(popen, ready_line, timeout_s)
        yield SpawnedProcess(pid=popen.pid, argv=argv, popen=popen)
    finally:
        end_process(popen)
        if popen.stdout is not None:
            popen.stdout.close()


# --- C programs -------------------------------------------------------------------

_session_build_dir: Path | None = None


def session_build_dir() -> Path:
    """Return a directory for compiled programs that is removed when Python exits."""
    global _session_build_dir
    if _session_build_dir is None:
        _session_build_dir = Path(tempfile.mkdtemp(prefix="prelock-cprog-"))
        atexit.register(shutil.rmtree, _session_build_dir, ignore_errors=True)
    return _session_build_dir


def build_c_program(source: str, name: str, out_dir: Path | None = None,
                    cflags: Sequence[str] = ("-O2", "-Wall", "-Wextra")) -> Path:
    """Compile C `source` with gcc into an executable called `name` and return its path.

    Without `out_dir`, the program goes to a directory shared by the test session and
    is reused when the same source, name and flags are built again.
    """
    if out_dir is None:
        digest = hashlib.sha256("\0".join([source, name, *cflags]).encode()).hexdigest()[:16]
        out_dir = session_build_dir() / digest
        if (out_dir / name).exists():
            return out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    exe_path = out_dir / name
    source_path = out_dir / f"{name}.c"
    source_path.write_text(source)

    result = subprocess.run([GCC_EXE, *cflags, "-o", str(exe_path), str(source_path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"gcc failed to build {source_path} "
                           f"(exit {result.returncode}):\n{result.stderr}")
    return exe_path


# Maps FILE read-only with MAP_PRIVATE, reads one byte per page so every page is
# present in the page tables, prints "ready" and waits for a signal.
# Options: -x adds PROT_EXEC (so the file counts as code), -n skips reading pages.
MAP_FILE_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int prot = PROT_READ, touch = 1, opt;
    while ((opt = getopt(argc, argv, "xn")) != -1) {
        if (opt == 'x') prot |= PROT_EXEC;
        else if (opt == 'n') touch = 0;
        else return 2;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: %s [-x] [-n] FILE\n", argv[0]);
        return 2;
    }
    int fd = open(argv[optind], O_RDONLY);
    if (fd < 0) { perror(argv[optind]); return 1; }
    struct stat st;
    if (fstat(fd, &st) < 0 || st.st_size == 0) {
        fprintf(stderr, "%s: empty or unreadable\n", argv[optind]);
        return 1;
    }
    unsigned char *map = mmap(NULL, st.st_size, prot, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) { perror("mmap"); return 1; }
    volatile unsigned long sum = 0;
    if (touch) {
        long page = sysconf(_SC_PAGESIZE);
        for (off_t off = 0; off < st.st_size; off += page)
            sum += map[off];
    }
    printf("ready\n");
    fflush(stdout);
    for (;;)
        pause();
}
"""


def build_map_file_program() -> Path:
    return build_c_program(MAP_FILE_SOURCE, "map_file")


# --- sshd -------------------------------------------------------------------------


def pick_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_tcp_port(popen: subprocess.Popen, port: int, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ProcessStartError(f"{popen.args[0]} exited with status {popen.returncode}. "
                                    f"Log:\n{read_log_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise ProcessStartError(f"{popen.args[0]}: port 127.0.0.1:{port} not accepting connections "
                            f"after {timeout_s:.0f} s. Log:\n{read_log_tail(log_path)}")


def read_log_tail(log_path: Path) -> str:
    try:
        data = log_path.read_bytes()
    except OSError as exc:
        return f"(log {log_path} unreadable: {exc})"
    return data[-LOG_TAIL_BYTES:].decode(errors="replace")


def write_sshd_config(work_dir: Path, port: int) -> Path:
    host_key = work_dir / "ssh_host_ed25519_key"
    subprocess.run([str(SSH_KEYGEN_EXE), "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True, capture_output=True)
    config_path = work_dir / "sshd_config"
    # Only the daemon's code pages matter to the tests, so every login is rejected.
    config_path.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {host_key}\n"
        f"PidFile {work_dir / 'sshd.pid'}\n"
        "UsePAM no\n"
        "PermitRootLogin no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "AuthorizedKeysFile none\n"
        "DenyUsers *\n"
    )
    return config_path


@contextlib.contextmanager
def run_sshd(work_dir: Path, exe: Path = SSHD_EXE,
             timeout_s: float = START_TIMEOUT_S) -> Iterator[SshdProcess]:
    """Run the real sshd in the foreground on a free port of 127.0.0.1 until exit."""
    require_executable(exe, "openssh-server")
    SSHD_PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    port = pick_free_port()
    config_path = write_sshd_config(work_dir, port)
    log_path = work_dir / "sshd.log"

    # -D keeps sshd in the foreground, so the PID is sshd itself, and -e logs to stderr.
    with open(log_path, "wb") as log, \
            spawn([exe, "-D", "-e", "-f", config_path], stdout=log, stderr=log) as spawned:
        wait_for_tcp_port(spawned.popen, port, timeout_s, log_path)
        yield SshdProcess(pid=spawned.pid, port=port, exe=exe, config_path=config_path,
                          log_path=log_path)


# --- containerd -------------------------------------------------------------------

# Plugins that need the network, or that would touch host state: the CRI plugin, and
# snapshotters that run modprobe or need a dedicated filesystem or device.
CONTAINERD_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
)


def toml_string(value: str | os.PathLike) -> str:
    # A JSON string of printable characters is also a valid TOML basic string.
    return json.dumps(os.fspath(value))


def write_containerd_config(work_dir: Path) -> tuple[Path, Path]:
    """Write a config that keeps every path of containerd inside `work_dir`."""
    socket_path = work_dir / "containerd.sock"
    disabled = ", ".join(toml_string(name) for name in CONTAINERD_DISABLED_PLUGINS)
    config_path = work_dir / "containerd.toml"
    # Config version 2 is the format of containerd 1.x, and containerd 2.x still reads it.
    # An empty metrics address turns the metrics listener off.
    config_path.write_text(
        "version = 2\n"
        f"root = {toml_string(work_dir / 'root')}\n"
        f"state = {toml_string(work_dir / 'state')}\n"
        f"disabled_plugins = [{disabled}]\n"
        "[grpc]\n"
        f"  address = {toml_string(socket_path)}\n"
        "[ttrpc]\n"
        f"  address = {toml_string(work_dir / 'containerd-ttrpc.sock')}\n"
        "[debug]\n"
        f"  address = {toml_string(work_dir / 'debug.sock')}\n"
        "[metrics]\n"
        '  address = ""\n'
    )
    return config_path, socket_path


def wait_for_socket(popen: subprocess.Popen, socket_path: Path, timeout_s: float,
                    log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise ProcessStartError(f"{popen.args[0]} exited with status {popen.returncode}. "
                                    f"Log:\n{read_log_tail(log_path)}")
        if socket_path.is_socket():
            return
        time.sleep(0.05)
    raise ProcessStartError(f"{popen.args[0]}: socket {socket_path} missing after "
                            f"{timeout_s:.0f} s. Log:\n{read_log_tail(log_path)}")


@contextlib.contextmanager
def run_containerd(work_dir: Path, exe: Path = CONTAINERD_EXE,
                   timeout_s: float = START_TIMEOUT_S) -> Iterator[ContainerdProcess]:
    """Run the real containerd with private root, state and sockets until exit."""
    require_executable(exe, "containerd")
    config_path, socket_path = write_containerd_config(work_dir)
    # sockaddr_un.sun_path has room for 108 bytes, including the terminating NUL.
    if len(os.fsencode(socket_path)) > 107:
        raise ProcessStartError(f"socket path {socket_path} is longer than 107 bytes: "
                                "pass a shorter work_dir")
    log_path = work_dir / "containerd.log"

    with open(log_path, "wb") as log, \
            spawn([exe, "--config", config_path], stdout=log, stderr=log) as spawned:
        wait_for_socket(spawned.popen, socket_path, timeout_s, log_path)
        yield ContainerdProcess(pid=spawned.pid, socket=socket_path, exe=exe,
                                config_path=config_path, log_path=log_path)


# --- checks -----------------------------------------------------------------------


def require_executable(exe: Path, debian_package: str) -> None:
    if not os.access(exe, os.X_OK):
        raise ProcessStartError(f"{exe} not found or not executable: install the Debian "
                                f"package {debian_package} (scripts/test.sh installs it)")


def read_exe(pid: int) -> Path:
    """Return the resolved target of /proc/PID/exe."""
    return Path(os.readlink(f"/proc/{pid}/exe"))


def is_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

