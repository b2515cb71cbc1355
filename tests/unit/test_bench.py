"""Tests of the thrash bench's pure parts: statistics, parsers, daemon configs, records."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import sys

import pytest
from click.testing import CliRunner
from rich.console import Console

from prelock import bench
from prelock.cli import main
from prelock.cli.bench import default_sizes, hog_cell, render_table
from prelock.config import parse_config
from prelock.errors import ConfigError, ExitCode, PrivilegeError

MiB = 1 << 20


# --- statistics -------------------------------------------------------------------

def test_percentile_nearest_rank():
    values = [float(n) for n in range(100, 0, -1)]
    assert bench.percentile(values, 0.50) == 50.0
    assert bench.percentile(values, 0.99) == 99.0
    assert bench.percentile(values, 1.0) == 100.0


def test_percentile_small_samples():
    assert bench.percentile([7.0], 0.99) == 7.0
    # With 10 samples, p99 is the largest: one slow heartbeat in ten shows in p99.
    assert bench.percentile([1.0] * 9 + [5.0], 0.99) == 5.0
    assert math.isnan(bench.percentile([], 0.5))


def test_summarize_heartbeats():
    stats = bench.summarize_heartbeats([0.002, 0.001, 0.003, 0.5])
    assert stats.count == 4
    assert stats.p50_s == 0.002
    assert stats.p99_s == 0.5
    assert stats.max_s == 0.5


def test_summarize_heartbeats_empty():
    stats = bench.summarize_heartbeats([])
    assert stats.count == 0
    assert math.isnan(stats.p99_s)


# --- workload output and smaps ----------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("heartbeat 1234.500000 0.002100\n", ("heartbeat", [1234.5, 0.0021])),
    ("pass 3 12582912\n", ("pass", [3.0, 12582912.0])),
    ("ready 4242\n", ("ready", [4242.0])),
])
def test_parse_workload_line(line, expected):
    assert bench.parse_workload_line(line) == expected


@pytest.mark.parametrize("line", [
    "",
    "\n",
    "heartbeat 1.0\n",  # missing the duration
    "heartbeat 1.0 fast\n",
    "pass 1 2 3\n",
    "Traceback (most recent call last):\n",
    "ready\n",
])
def test_parse_workload_line_malformed(line):
    assert bench.parse_workload_line(line) is None


SMAPS = """\
55d0c0000000-55d0c0100000 r--s 00000000 fd:01 1234   /tmp/prelock-bench-x/critical.data
Size:               1024 kB
Rss:                 512 kB
Pss:                 256 kB
Locked:              256 kB
VmFlags: rd sh mr mw me ms lo
7f0000000000-7f0000200000 r-xs 00000000 fd:01 1235   /tmp/prelock-bench-x/hog.code
Size:               2048 kB
Rss:                2048 kB
Locked:                0 kB
VmFlags: rd ex sh mr mw me ms
7f0000400000-7f0000500000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 100 kB
VmFlags: rd wr mr mw me ac lo lf
"""


def test_parse_smaps_locked_rss_counts_locked_vmas():
    # Rss, not the proportional Locked: field, of the two VMAs flagged 'lo'.
    assert bench.parse_smaps_locked_rss(SMAPS) == (512 + 100) * 1024


def test_parse_smaps_locked_rss_ignores_lookalike_flags():
    text = "Rss: 64 kB\nVmFlags: rd mr mw me lf\n"
    assert bench.parse_smaps_locked_rss(text) == 0


# --- daemon configs ---------------------------------------------------------------

BENCH_DIR = "/tmp/prelock-bench-a+b"


def generated_config(mode: str, lock_scope: str = "bench"):
    settings = bench.ThrashSettings(lock_scope=lock_scope, scan_interval_s=1.0)
    raw = bench.daemon_config(mode, settings, "/tmp/state", BENCH_DIR)
    return raw, parse_config(json.dumps(raw), f"<{mode}>")


def test_daemon_config_critical_mode():
    raw, config = generated_config("critical")
    assert config.critical.names == ("bench-critical",)
    assert config.others is False
    assert config.scan.interval_s == 1.0
    assert str(config.state_dir) == "/tmp/state"


def test_daemon_config_all_mode_keeps_defaults():
    raw, config = generated_config("all")
    assert "critical" not in raw
    assert "others" not in raw
    assert "lock" not in raw
    assert config.others is True
    assert config.lock.budget.fraction == 0.10
    assert "kubelet" in config.critical.names


def test_daemon_config_bench_scope_matches_only_bench_files():
    _, config = generated_config("all")
    (pattern,) = config.files.include
    assert pattern.search(BENCH_DIR + "/critical.data")
    # The '+' in the directory name is literal, and a sibling directory does not match.
    assert not pattern.search("/tmp/prelock-bench-aab/critical.data")
    assert not pattern.search(BENCH_DIR + "2/critical.data")
    assert not pattern.search("/usr/lib/x86_64-linux-gnu/libc.so.6")


def test_daemon_config_machine_scope_has_no_file_filter():
    raw, config = generated_config("all", lock_scope="machine")
    assert "files" not in raw
    assert config.files.include == ()


def test_daemon_config_rejects_mode_without_daemon():
    with pytest.raises(ValueError, match="none"):
        bench.daemon_config("none", bench.ThrashSettings(), "/tmp/state", BENCH_DIR)


# --- outcomes and settings --------------------------------------------------------

@pytest.mark.parametrize("returncode, oom_kills, expected", [
    (None, 0, "alive"),
    (None, 1, "alive"),
    (-signal.SIGKILL, 1, "oom-killed"),
    (-signal.SIGKILL, 0, "killed by SIGKILL"),
    (-signal.SIGSEGV, 1, "killed by SIGSEGV"),
    (1, 0, "exited with status 1"),
])
def test_hog_outcome(returncode, oom_kills, expected):
    assert bench.hog_outcome(returncode, oom_kills) == expected


def test_settings_reject_unknown_mode():
    with pytest.raises(ConfigError, match="fast"):
        bench._check_settings(bench.ThrashSettings(modes=("none", "fast")))


def test_settings_reject_working_set_above_limit():
    settings = bench.ThrashSettings(limit_bytes=256 * MiB, critical_bytes=192 * MiB, hog_bytes=96 * MiB)
    with pytest.raises(ConfigError, match="--limit"):
        bench._check_settings(settings)


@pytest.mark.parametrize("field", ["max_seconds", "baseline_seconds"])
@pytest.mark.parametrize("seconds", [math.nan, math.inf, 0.0])
def test_settings_reject_endless_phase(field, seconds):
    settings = bench.ThrashSettings(**{field: seconds})
    with pytest.raises(ConfigError, match=field):
        bench._check_settings(settings)


def test_settings_reject_hog_without_leak():
    with pytest.raises(ConfigError, match="leak at least one page"):
        bench._check_settings(bench.ThrashSettings(leak_bytes=0))


def test_settings_reject_leak_beyond_limit():
    with pytest.raises(ConfigError, match="lower --leak"):
        bench._check_settings(bench.ThrashSettings(leak_bytes=1 << 40))


def test_default_sizes_follow_limit():
    assert default_sizes(512 * MiB, None, None) == (192 * MiB, 96 * MiB)
    assert default_sizes(256 * MiB, None, None) == (96 * MiB, 48 * MiB)
    assert default_sizes(256 * MiB, 64 * MiB, None) == (64 * MiB, 48 * MiB)
    assert default_sizes(256 * MiB, None, 8 * MiB) == (96 * MiB, 8 * MiB)


def test_default_sizes_whole_pages_below_limit():
    critical_bytes, hog_bytes = default_sizes(100 * MiB + 12345, None, None)
    assert critical_bytes % 4096 == 0
    assert hog_bytes % 4096 == 0
    # The settings check requires the working sets to fit below the limit.
    bench._check_settings(bench.ThrashSettings(limit_bytes=100 * MiB + 12345, critical_bytes=critical_bytes,
                                               hog_bytes=hog_bytes))


def test_settings_reject_unknown_lock_scope():
    with pytest.raises(ConfigError, match="cluster"):
        bench._check_settings(bench.ThrashSettings(lock_scope="cluster"))


def test_missing_memory_controller_is_privilege_error(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw,relatime shared:12 - proc proc rw\n")
    with pytest.raises(PrivilegeError) as raised:
        bench.check_can_run(bench.ThrashSettings(), mountinfo=str(mountinfo))
    assert raised.value.exit_code == ExitCode.MISSING_PRIVILEGE


# --- records and rendering --------------------------------------------------------

def sample_report() -> bench.ThrashReport:
    baseline = bench.HeartbeatStats(100, 0.002, 0.003, 0.004)
    none = bench.ModeResult(
        mode="none", hog_killed=False, hog_end_s=90.02, hog_exit="alive", critical_alive=True,
        heartbeat=bench.HeartbeatStats(500, 0.2, 0.7, 1.0016), critical_major_faults=12000,
        critical_read_bytes=33 << 30, locked_bytes=0, oom_kills=0, hog_leaked_bytes=400 * MiB,
        samples=[(0.0, 0.002), (0.05, 0.7)])
    killed = bench.ModeResult(
        mode="critical", hog_killed=True, hog_end_s=40.53, hog_exit="oom-killed", critical_alive=True,
        heartbeat=bench.HeartbeatStats(0, math.nan, math.nan, math.nan), critical_major_faults=0,
        critical_read_bytes=0, locked_bytes=288 * MiB, oom_kills=1, hog_leaked_bytes=180 * MiB,
        warnings=["something odd"])
    return bench.ThrashReport(bench.ThrashSettings(), {"kernel": "6.18"}, baseline, [none, killed])


def test_hog_cell():
    none, killed = sample_report().modes
    assert hog_cell(none) == "alive at 90s"
    assert hog_cell(killed) == "OOM-killed at 40.5s"


def test_report_to_json_replaces_nan():
    data = bench.report_to_json(sample_report())
    text = json.dumps(data, allow_nan=False)
    assert data["modes"][1]["heartbeat"]["p99_s"] is None
    assert data["modes"][0]["samples"] == [[0.0, 0.002], [0.05, 0.7]]
    assert json.loads(text)["settings"]["limit_bytes"] == 512 * MiB


def test_render_table_fits_100_columns():
    console = Console(record=True, width=100)
    console.print(render_table(sample_report()))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "alive at 90s" in text
    assert "OOM-killed at 40.5s" in text
    assert "…" not in text
    # p99 ratio to the idle baseline: 0.7 s / 3 ms.
    assert re.search(r"\b233\.3\b", text)
    assert "288.0MiB" in text


# --- command line -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["none,fast", ",", ""])
def test_cli_rejects_invalid_modes(value):
    result = CliRunner().invoke(main, ["bench", "thrash", "--modes", value])
    assert result.exit_code == ExitCode.USAGE
    assert "--modes" in result.output


def test_cli_rejects_invalid_limit():
    result = CliRunner().invoke(main, ["bench", "thrash", "--limit", "512MB"])
    assert result.exit_code == ExitCode.USAGE
    assert "512MB" in result.output


@pytest.mark.parametrize("option", ["--max-seconds", "--baseline-seconds"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e308", "0.5"])
def test_cli_rejects_seconds_out_of_range(option, value):
    result = CliRunner().invoke(main, ["bench", "thrash", option, value])
    assert result.exit_code == ExitCode.USAGE
    assert f"Invalid value for '{option}'" in result.stderr
    assert "from 1 to 3600" in result.stderr


def test_cli_rejects_leak_below_one_page():
    result = CliRunner().invoke(main, ["bench", "thrash", "--leak", "0"])
    assert result.exit_code == ExitCode.USAGE
    assert "less than one page" in result.stderr


def test_cli_rejects_size_with_too_many_digits():
    result = CliRunner().invoke(main, ["bench", "thrash", "--limit", "9" * 400])
    assert result.exit_code == ExitCode.USAGE
    assert "too many digits" in result.stderr


def test_cli_help_says_sizes_follow_limit():
    result = CliRunner().invoke(main, ["bench", "thrash", "--help"])
    text = " ".join(result.output.split())
    assert "--critical-size defaults to 3/8 of it and --hog-size to 3/16" in text
    assert "[default: (3/8 of --limit, 192MiB at 512MiB)]" in text


def test_cli_error_has_no_leading_empty_line():
    # Settings that fail only inside the run: as root the working sets exceed the limit,
    # otherwise the missing privilege stops it first.
    result = CliRunner().invoke(main, ["bench", "thrash", "--limit", "16KiB", "--critical-size", "8KiB",
                                       "--hog-size", "8KiB"])
    assert result.exit_code in (ExitCode.USAGE, ExitCode.MISSING_PRIVILEGE)
    assert result.stderr.startswith("prelock: ")


def test_plot_hint_names_venv_pip(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else find_spec(name, *args))
    result = CliRunner().invoke(main, ["bench", "thrash", "--plot", "out.png"])
    assert result.exit_code == ExitCode.USAGE
    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    assert result.stderr.startswith(f"prelock: --plot needs matplotlib, which is not installed: run {pip} install "
                                    "matplotlib")
