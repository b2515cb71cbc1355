"""`prelock check-config` through the real click group: summaries, errors and exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from prelock.cli import main
from prelock.cli.check_config import format_duration, format_summary
from prelock.config import MAX_CONFIG_BYTES, Config, parse_config
from prelock.units import format_size

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "prelock.yaml"

# (case id, config text, dotted key the error must name, line the error must name)
BAD_CONFIGS = [
    ("unknown top-level key", "lgo_level: info\n", "lgo_level", 1),
    ("unknown nested key", "lock:\n  mode: mapped\n  budgt: 10%\n", "lock.budgt", 3),
    ("top level is a list", "- critical\n- lock\n", "(top level)", 1),
    ("top level is a string", "just text\n", "(top level)", 1),
    ("section is a list", "lock: [budget]\n", "lock", 1),
    ("section without value", "critical:\nothers: true\n", "critical", 1),
    ("duplicate key", "scan:\n  interval: 10s\nscan:\n  interval: 20s\n", "scan", 3),
    ("names is a string", "critical:\n  names: kubelet\n", "critical.names", 2),
    ("names without value", "critical:\n  names:\n", "critical.names", 2),
    ("empty name", "critical:\n  names: [kubelet, '']\n", "critical.names[1]", 2),
    ("blank name", "critical:\n  names: [kubelet, '  ']\n", "critical.names[1]", 2),
    ("name with slash", "critical:\n  names: [/usr/bin/kubelet]\n", "critical.names[0]", 2),
    ("name that YAML reads as boolean", "critical:\n  names: [kubelet, on]\n", "critical.names[1]", 2),
    ("exe glob not absolute", "critical:\n  exe: [kubelet]\n", "critical.exe[0]", 2),
    ("invalid cgroup regex", "critical:\n  cgroups: ['kubelet(']\n", "critical.cgroups[0]", 2),
    ("empty pod cgroup regex", "critical:\n  pod_cgroups: [kubepods, '']\n", "critical.pod_cgroups[1]", 2),
    ("others as quoted string", 'others: "yes"\n', "others", 1),
    ("others as number", "others: 1\n", "others", 1),
    ("include is a string", "files:\n  include: '^/usr/'\n", "files.include", 2),
    ("invalid include regex", "files:\n  include: ['*.so']\n", "files.include[0]", 2),
    ("unknown kinds", "files:\n  kinds: libraries\n", "files.kinds", 2),
    ("unknown mode", "lock:\n  mode: everything\n", "lock.mode", 2),
    ("budget 0%", "lock:\n  budget: 0%\n", "lock.budget", 2),
    ("budget over 100%", "lock:\n  budget: 101%\n", "lock.budget", 2),
    ("budget tiny percentage", "lock:\n  budget: 0.0000001%\n", "lock.budget", 2),
    ("budget zero bytes", "lock:\n  budget: 0\n", "lock.budget", 2),
    ("budget bytes without %", "lock:\n  budget: 10\n", "lock.budget", 2),
    ("budget negative", "lock:\n  budget: -1GiB\n", "lock.budget", 2),
    ("budget decimal unit", "lock:\n  budget: 4GB\n", "lock.budget", 2),
    ("budget in words", "lock:\n  budget: 10 percent\n", "lock.budget", 2),
    ("budget lowercase unit", "lock:\n  budget: 4gib\n", "lock.budget", 2),
    ("budget as float", "lock:\n  budget: 0.1\n", "lock.budget", 2),
    ("max_file_size zero", "lock:\n  max_file_size: 0\n", "lock.max_file_size", 2),
    ("max_file_size percentage", "lock:\n  max_file_size: 10%\n", "lock.max_file_size", 2),
    ("min_available over 100%", "lock:\n  min_available: 150%\n", "lock.min_available", 2),
    ("min_available negative", "lock:\n  min_available: -5\n", "lock.min_available", 2),
    ("linger without unit", "lock:\n  linger: 10\n", "lock.linger", 2),
    ("linger in days", "lock:\n  linger: 1d\n", "lock.linger", 2),
    ("linger negative", "lock:\n  linger: -1s\n", "lock.linger", 2),
    ("interval without unit", "scan:\n  interval: 60\n", "scan.interval", 2),
    ("interval in days", "scan:\n  interval: 1d\n", "scan.interval", 2),
    ("interval below 1s", "scan:\n  interval: 500ms\n", "scan.interval", 2),
    ("interval zero", "scan:\n  interval: 0s\n", "scan.interval", 2),
    ("listen without port", "metrics:\n  listen: localhost\n", "metrics.listen", 2),
    ("listen port 0", "metrics:\n  listen: ':0'\n", "metrics.listen", 2),
    ("listen port too large", "metrics:\n  listen: '127.0.0.1:65536'\n", "metrics.listen", 2),
    ("listen IPv6 without brackets", "metrics:\n  listen: '::1:9464'\n", "metrics.listen", 2),
    ("listen as number", "metrics:\n  listen: 9464\n", "metrics.listen", 2),
    ("state_dir relative", "state_dir: var/lib/prelock\n", "state_dir", 1),
    ("state_dir without value", "state_dir:\n", "state_dir", 1),
    ("unknown log_level", "log_level: verbose\n", "log_level", 1),
    ("log_level uppercase", "log_level: INFO\n", "log_level", 1),
    ("python tag", "others: !!python/name:os.system\n", "others", 1),
    ("names nested 600 levels", "critical: {names: " + "[" * 600 + "]" * 600 + "}\n", "critical.names[0]", 1),
    ("merge key", "lock:\n  <<: {mode: mapped}\n", "lock.<<", 2),
    ("state_dir with NUL", 'state_dir: "/tmp/a\\0b"\n', "state_dir", 1),
]


def run_check(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, ["check-config", *args], input=stdin)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prelock.yaml"
    path.write_text(text)
    return path


def read_memtotal_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal line in /proc/meminfo")


@pytest.mark.parametrize(("case", "text", "key", "line"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_2(tmp_path, case, text, key, line):
    path = write_config(tmp_path, text)

    result = run_check(str(path))

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert f"{path}:{line}: {key}: " in result.stderr


def test_bad_config_lists_every_error(tmp_path):
    path = write_config(tmp_path, "others: maybe\nlock:\n  budget: 0%\n  linger: 10\nscan:\n  interval: 1d\n")

    result = run_check(str(path))

    assert result.exit_code == 2
    assert f"invalid configuration in {path}: 4 errors" in result.stderr
    for line, key in [(1, "others"), (3, "lock.budget"), (4, "lock.linger"), (6, "scan.interval")]:
        assert f"{path}:{line}: {key}: " in result.stderr


def test_syntax_error_names_line(tmp_path):
    path = write_config(tmp_path, "lock:\n  budget: 10%\n\tmode: mapped\n")

    result = run_check(str(path))

    assert result.exit_code == 2
    assert f"{path}:3: invalid YAML" in result.stderr


@pytest.mark.parametrize(("make_path", "message"), [
    (lambda tmp: tmp / "absent.yaml", "config file not found"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: Path("/dev/null"), "not a regular file (a character device)"),
])
def test_unusable_file_exits_2(tmp_path, make_path, message):
    result = run_check(str(make_path(tmp_path)))

    assert result.exit_code == 2
    assert message in result.stderr


def test_fifo_exits_2(tmp_path):
    fifo = tmp_path / "prelock.yaml"
    os.mkfifo(fifo)

    result = run_check(str(fifo))

    assert result.exit_code == 2
    assert "not a regular file (a FIFO)" in result.stderr


def test_binary_file_exits_2(tmp_path):
    path = tmp_path / "prelock.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")

    result = run_check(str(path))

    assert result.exit_code == 2
    assert "not valid UTF-8" in result.stderr


def test_oversized_file_exits_2(tmp_path):
    path = tmp_path / "prelock.yaml"
    path.write_bytes(b"# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))

    result = run_check(str(path))

    assert result.exit_code == 2
    assert "larger than 1.0MiB" in result.stderr


def test_shipped_config_is_valid():
    result = run_check(str(SHIPPED_CONFIG))

    assert result.exit_code == 0, result.stderr
    assert f"{SHIPPED_CONFIG}: valid" in result.stdout


def test_summary_resolves_budget_against_memtotal(tmp_path):
    memtotal_bytes = read_memtotal_bytes()
    path = write_config(tmp_path, "lock:\n  budget: 20%\n  mode: mapped\nscan:\n  interval: 90s\n")

    result = run_check(str(path))

    assert result.exit_code == 0, result.stderr
    expected_budget = f"20% of MemTotal {format_size(memtotal_bytes)} = {format_size(int(memtotal_bytes * 0.2))}"
    assert expected_budget in result.stdout
    assert "mapped" in result.stdout
    assert "14 names" in result.stdout
    assert "90s" in result.stdout


def test_deep_nesting_exits_2_without_traceback(tmp_path):
    path = write_config(tmp_path, "critical: {names: " + "[" * 600 + "]" * 600 + "}\n")

    result = run_check(str(path))

    assert result.exit_code == 2
    assert not isinstance(result.exception, RecursionError)
    assert f"{path}:1: critical.names[0]: nested too deeply" in result.stderr


def test_nul_byte_error_is_one_line(tmp_path):
    path = write_config(tmp_path, "lock:\n  mode: mapped\x00\n")

    result = run_check(str(path))

    assert result.exit_code == 2
    assert result.stderr.splitlines()[1:] == [
        f"{path}:2: invalid YAML: character U+0000 (NUL) at column 15 is not allowed; remove it "
        "(YAML allows no control characters other than tab and line breaks)"]


SIZED_FOR_OTHER_NODES = [
    ("budget above MemTotal", "lock: {budget: 100TiB}\n",
     "WARNING: lock.budget 100.0TiB is larger than MemTotal 23.5GiB"),
    ("min_available 100%", "lock: {min_available: 100%}\n",
     "WARNING: lock.min_available 100% = 23.5GiB is at least MemTotal 23.5GiB"),
    ("min_available above MemTotal", "lock: {min_available: 64GiB}\n",
     "WARNING: lock.min_available 64.0GiB = 64.0GiB is at least MemTotal 23.5GiB"),
    ("min_available and budget above 100%", "lock: {min_available: 96%, budget: 5%}\n",
     "WARNING: lock.min_available 96% plus lock.budget 5% exceed MemTotal 23.5GiB"),
]


@pytest.mark.parametrize(("case", "text", "warning"), SIZED_FOR_OTHER_NODES,
                         ids=[c[0] for c in SIZED_FOR_OTHER_NODES])
def test_summary_warns_about_sizes_beyond_memtotal(case, text, warning):
    summary = format_summary(parse_config(text, "x.yaml"), int(23.5 * (1 << 30)))

    warnings = [line for line in summary.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert warnings[0].startswith(warning)


def test_summary_of_shipped_config_has_no_warning():
    summary = format_summary(parse_config(SHIPPED_CONFIG.read_text(), "x.yaml"), int(23.5 * (1 << 30)))

    assert "WARNING" not in summary


def test_budget_above_memtotal_warns_and_exits_0(tmp_path):
    path = write_config(tmp_path, "lock:\n  budget: 100000TiB\n")

    result = run_check(str(path))

    assert result.exit_code == 0, result.stderr
    assert f"{path}: valid" in result.stdout
    assert f"WARNING: lock.budget {format_size(100000 << 40)} is larger than MemTotal" in result.stdout


def test_quiet_prints_warnings_to_stderr(tmp_path):
    path = write_config(tmp_path, "lock:\n  min_available: 100%\n")

    result = run_check("--quiet", str(path))

    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr.startswith("WARNING: lock.min_available 100%")


def test_quiet_prints_nothing_when_valid(tmp_path):
    path = write_config(tmp_path, "log_level: debug\n")

    result = run_check("--quiet", str(path))

    assert result.exit_code == 0
    assert result.output == ""


def test_quiet_still_prints_errors(tmp_path):
    path = write_config(tmp_path, "log_level: loud\n")

    result = run_check("-q", str(path))

    assert result.exit_code == 2
    assert f"{path}:1: log_level: " in result.stderr


def test_stdin_config():
    result = run_check("-", stdin="lock:\n  budget: 4GiB\n")

    assert result.exit_code == 0, result.stderr
    assert "<stdin>: valid" in result.stdout
    assert "4.0GiB" in result.stdout


def test_stdin_errors_name_stdin():
    result = run_check("-", stdin="lock:\n  budgt: 4GiB\n")

    assert result.exit_code == 2
    assert "<stdin>:2: lock.budgt: unknown key" in result.stderr


def test_format_summary_for_defaults():
    summary = format_summary(Config(), 64 << 30)

    assert summary.splitlines()[0] == "built-in defaults (no file at /etc/prelock/prelock.yaml): valid"
    assert "10% of MemTotal 64.0GiB = 6.4GiB" in summary
    assert "5% of MemTotal 64.0GiB = 3.2GiB" in summary
    assert "interval       1m" in summary
    assert "linger         10m" in summary
    assert "metrics        off" in summary


def test_format_summary_shows_metrics_address():
    summary = format_summary(parse_config("metrics: {listen: ':9464'}", "x.yaml"), 1 << 30)

    assert "metrics        :9464" in summary


@pytest.mark.parametrize(("seconds", "text"), [(3600.0, "1h"), (600.0, "10m"), (90.0, "90s"), (1.5, "1500ms"),
                                                (0.0, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
