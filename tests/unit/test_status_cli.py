"""`prelock status` on status files that are missing, stale, malformed or not files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from prelock.cli import main


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (tmp_path / "prelock.yaml").write_text(f"state_dir: {state_dir}\n")
    return state_dir


def run_status(state: Path, *args: str):
    return CliRunner().invoke(main, ["status", "-c", str(state.parent / "prelock.yaml"), *args])


def valid_record(pid: int) -> dict:
    return {"pid": pid, "cycles": 3, "locked_bytes": 4096, "running": True,
            "files": [{"path": "/usr/bin/x", "tier": "critical", "locked_bytes": 4096,
                       "address": 4096, "length_bytes": 4096}]}


@pytest.mark.parametrize(("content", "expected"), [
    ("[]", "not a JSON object"),
    ("{}", "'pid' is missing or not an integer"),
    ('{"pid": "x", "cycles": 1, "locked_bytes": 0, "files": []}', "'pid' is missing or not an integer"),
    ('{"pid": 1, "cycles": 1, "locked_bytes": 0, "files": 5}', "'files' is missing or not a list"),
    ('{"pid": 1, "cycles": 1, "locked_bytes": 0, "files": [{}]}', "files[0].path is missing"),
    ('{"pid": 1, "cycles": 1, "locked_bytes": "big", "files": []}', "'locked_bytes' is missing"),
    ("{not json", "not valid JSON"),
    ('{"pid": 1, "cycles": 1, "locked_bytes": 0, "files": [{"path": "/x", "tier": "critical", '
     '"locked_bytes": 0, "address": 4096, "length_bytes": 1180591620717411303424}]}', "out of range"),
])
def test_status_malformed_file(state: Path, content: str, expected: str):
    (state / "status.json").write_text(content)
    result = run_status(state)
    assert result.exit_code == 1
    assert expected in result.output
    assert "Traceback" not in result.output


def test_status_fifo_does_not_block(state: Path):
    os.mkfifo(state / "status.json")
    result = run_status(state)
    assert result.exit_code == 1
    assert "not a regular file" in result.output


def test_status_missing_file(state: Path):
    result = run_status(state)
    assert result.exit_code == 1
    assert "no status file" in result.output


def test_status_stopped_daemon_exits_1(state: Path):
    record = valid_record(os.getpid())
    record["running"] = False
    (state / "status.json").write_text(json.dumps(record))
    result = run_status(state, "--no-verify")
    assert result.exit_code == 1
    assert "has stopped" in result.output


def test_status_dead_pid_exits_1(state: Path):
    # PID 2**22 + 1 is above the kernel's pid_max ceiling, so no process has it.
    (state / "status.json").write_text(json.dumps(valid_record(2**22 + 1)))
    result = run_status(state, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["running"] is False


def test_status_stale_file_exits_1(state: Path):
    # A child whose command line names prelock stands in for a daemon that stopped cycling.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "prelock"])
    try:
        record = valid_record(child.pid)
        record["updated_at"] = time.time() - 3600
        (state / "status.json").write_text(json.dumps(record))
        result = run_status(state, "--no-verify")
    finally:
        child.kill()
        child.wait()
    assert result.exit_code == 1
    assert "the daemon may be stuck" in result.output
