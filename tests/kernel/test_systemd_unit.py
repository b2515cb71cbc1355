"""systemd/prelock.service passes systemd-analyze verify and keeps its invariants."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

UNIT_PATH = Path(__file__).resolve().parents[2] / "systemd" / "prelock.service"
INSTALLED_EXE = "/usr/local/bin/prelock"
EXPECTED_CAPABILITIES = {"CAP_IPC_LOCK", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH",
                         "CAP_CHECKPOINT_RESTORE"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse unit file text into section -> key -> values, keeping repeated keys in order."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def words(values: list[str]) -> list[str]:
    return [word for value in values for word in value.split()]


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT_PATH.read_text())


def venv_prelock_exe() -> Path:
    exe = Path(sys.executable).parent / "prelock"
    if not exe.exists():
        pytest.fail(f"{exe} not found: install the package into this venv "
                    "(pip install -e '.[test]')")
    return exe


def test_unit_passes_systemd_analyze_verify(tmp_path: Path):
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.fail("systemd-analyze not found: install the Debian package systemd")

    # verify rejects an ExecStart binary that does not exist, and /usr/local/bin/prelock
    # exists only after scripts/install-and-run.sh ran.
    text = UNIT_PATH.read_text()
    assert f"ExecStart={INSTALLED_EXE} " in text
    copy_path = tmp_path / "prelock.service"
    copy_path.write_text(text.replace(f"ExecStart={INSTALLED_EXE} ",
                                      f"ExecStart={venv_prelock_exe()} "))

    result = subprocess.run([systemd_analyze, "verify", str(copy_path)],
                            capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    # verify reports unknown keys and invalid values on stderr but still exits 0.
    unit_lines = [line for line in output.splitlines() if "prelock.service" in line]
    assert unit_lines == [], output


def test_unit_is_notify_type(unit):
    assert unit["Service"]["Type"] == ["notify"]


def test_unit_exec_lines(unit):
    assert unit["Service"]["ExecStart"] == [f"{INSTALLED_EXE} run -c /etc/prelock/prelock.yaml"]
    assert unit["Service"]["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service"]["Restart"] == ["on-failure"]


def test_unit_starts_before_node_agents(unit):
    before = set(words(unit["Unit"]["Before"]))
    for agent in ("kubelet.service", "containerd.service", "docker.service", "crio.service"):
        assert agent in before
    assert "local-fs.target" in words(unit["Unit"]["After"])
    assert unit["Unit"]["DefaultDependencies"] == ["no"]
    # Without default dependencies, stopping at shutdown must be stated explicitly.
    assert "shutdown.target" in words(unit["Unit"]["Conflicts"])
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_unit_memory_settings(unit):
    assert unit["Service"]["LimitMEMLOCK"] == ["infinity"]
    assert unit["Service"]["OOMScoreAdjust"] == ["-1000"]


def test_unit_capabilities_exact(unit):
    assert set(words(unit["Service"]["CapabilityBoundingSet"])) == EXPECTED_CAPABILITIES
    assert set(words(unit["Service"]["AmbientCapabilities"])) == EXPECTED_CAPABILITIES


def test_unit_hardening(unit):
    service = unit["Service"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["StateDirectory"] == ["prelock"]
    assert service["ProtectHome"] == ["read-only"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    for key in ("PrivateTmp", "NoNewPrivileges", "MemoryDenyWriteExecute", "LockPersonality",
                "RestrictRealtime", "ProtectKernelTunables"):
        assert service[key] == ["yes"], key
    assert service["SystemCallArchitectures"] == ["native"]


def test_unit_keeps_proc_readable(unit):
    # ProcSubset=pid hides /proc/meminfo, and ProtectProc= hides other processes.
    assert "ProcSubset" not in unit["Service"]
    assert "ProtectProc" not in unit["Service"]
