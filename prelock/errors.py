"""Exit codes and the one place that translates errors for the CLI."""

from __future__ import annotations

import enum
import errno


class ExitCode(enum.IntEnum):
    OK = 0
    RUNTIME_FAILURE = 1
    USAGE = 2  # also an invalid configuration
    MISSING_PRIVILEGE = 3


class PrelockError(Exception):
    """An error the CLI reports as one line and turns into an exit code."""

    exit_code = ExitCode.RUNTIME_FAILURE


class ConfigError(PrelockError):
    exit_code = ExitCode.USAGE


class PrivilegeError(PrelockError):
    exit_code = ExitCode.MISSING_PRIVILEGE


class ProcessGone(Exception):
    """The process exited between listing and reading: normal, not an error."""

    def __init__(self, pid: int):
        super().__init__(f"process {pid} exited")
        self.pid = pid


class AccessDenied(Exception):
    """Reading a process was denied: skipped with a reason."""

    def __init__(self, pid: int, path: str):
        super().__init__(f"access denied to {path}")
        self.pid = pid
        self.path = path


_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ESRCH})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


def translate_proc_error(exc: OSError, pid: int, path: str) -> Exception:
    """Map an OSError from reading /proc/PID to ProcessGone, AccessDenied or itself.

    A process that exits while being read makes its /proc files fail with ENOENT or
    ESRCH, and reading maps of an exited process can return 0 bytes; EACCES and EPERM
    come from ptrace access checks on maps, pagemap and map_files.
    """
    if exc.errno in _GONE_ERRNOS:
        return ProcessGone(pid)
    if exc.errno in _DENIED_ERRNOS:
        return AccessDenied(pid, path)
    return exc
