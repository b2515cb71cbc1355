"""State files: atomic writes that never follow or block on what sits at their names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prelock import snapshot, state
from prelock.errors import PrelockError


def test_write_json_replaces_fifo_at_temporary_name(tmp_path: Path):
    os.mkfifo(tmp_path / "status.json.tmp")
    state.write_json(tmp_path / "status.json", {"a": 1})
    assert json.loads((tmp_path / "status.json").read_text()) == {"a": 1}
    assert not (tmp_path / "status.json.tmp").exists()


def test_write_json_does_not_follow_symlink(tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "status.json.tmp").symlink_to(victim)
    state.write_json(tmp_path / "status.json", {"a": 1})
    assert victim.read_text() == "keep"
    assert json.loads((tmp_path / "status.json").read_text()) == {"a": 1}


def test_read_json_rejects_fifo(tmp_path: Path):
    os.mkfifo(tmp_path / "snapshot.json")
    with pytest.raises(OSError, match="not a regular file"):
        state.read_json(tmp_path / "snapshot.json")


def test_acquire_rejects_fifo_lock(tmp_path: Path):
    os.mkfifo(tmp_path / "lock")
    with pytest.raises(PrelockError, match="not a regular file"):
        state.acquire(tmp_path)


def test_acquire_twice_names_owner(tmp_path: Path):
    fd = state.acquire(tmp_path)
    try:
        # flock locks belong to the open file description, so a second open conflicts.
        with pytest.raises(PrelockError, match=f"pid {os.getpid()}"):
            state.acquire(tmp_path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("extents", ["[[0, Infinity]]", "[[0]]", "[[5, 2]]", "[[-1, 2]]", '"x"'])
def test_snapshot_bad_extents_ignored(tmp_path: Path, extents: str):
    (tmp_path / "snapshot.json").write_text(
        '{"version": 1, "files": [{"path": "/x", "dev": 1, "inode": 2, "size_bytes": 3, "mtime_ns": 4, '
        f'"tier": "critical", "extents": {extents}}}]}}')
    assert snapshot.read_snapshot(tmp_path) == []
