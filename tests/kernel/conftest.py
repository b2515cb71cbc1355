"""Fixtures that run real programs (sshd, containerd, small C programs) as root.

Test modules in this directory import the helpers as `import procs`: pytest puts
this directory on sys.path because it has no __init__.py.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import procs


def require_root() -> None:
    # Fixtures check too, so a test that lacks the `root` marker is skipped with
    # the same reason instead of failing halfway through a start.
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[procs.SshdProcess]:
    """A real /usr/sbin/sshd listening on a free port of 127.0.0.1."""
    require_root()
    with procs.run_sshd(tmp_path) as process:
        yield process


@pytest.fixture
def containerd() -> Iterator[procs.ContainerdProcess]:
    """A real /usr/bin/containerd with private root, state and sockets."""
    require_root()
    # A short directory, because a unix socket path is limited to 107 bytes and
    # pytest's tmp_path grows with the test name.
    with tempfile.TemporaryDirectory(prefix="prelock-ctrd-") as work_dir:
        with procs.run_containerd(Path(work_dir)) as process:
            yield process


@pytest.fixture
def map_file_program() -> Path:
    """Path of a compiled program: `map_file [-x] [-n] FILE` maps FILE, prints "ready", waits."""
    return procs.build_map_file_program()
