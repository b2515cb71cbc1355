"""Config parsing, validation, file reading and the critical-process matcher."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prelock import config as config_module
from prelock.config import (
    DEFAULT_CONFIG_PATHS,
    Config,
    ConfigProblem,
    CriticalSelector,
    InvalidConfigError,
    Size,
    load_config,
    parse_config,
)
from prelock.errors import ConfigError, ExitCode

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "prelock.yaml"
GiB = 1 << 30


def problems_of(text: str) -> tuple[ConfigProblem, ...]:
    with pytest.raises(InvalidConfigError) as excinfo:
        parse_config(text, "test.yaml")
    return excinfo.value.problems


# --- defaults and good configs ---------------------------------------------------------


def test_shipped_file_equals_defaults():
    shipped = load_config(SHIPPED_CONFIG)

    assert shipped.source == str(SHIPPED_CONFIG)
    assert dataclasses.replace(shipped, source="<defaults>") == Config()


def test_default_values():
    config = Config()

    assert config.lock.budget == Size(fraction=0.10)
    assert config.lock.max_file_size_bytes == GiB
    assert config.lock.min_available == Size(fraction=0.05)
    assert config.lock.linger_s == 600.0
    assert config.scan.interval_s == 60.0
    assert config.metrics.listen is None
    assert config.state_dir == Path("/var/lib/prelock")
    assert "containerd-shim-runc-v2" in config.critical.names
    assert config.source == "<defaults>"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "--- # comment\n"])
def test_empty_document_means_defaults(text):
    config = parse_config(text, "empty.yaml")

    assert dataclasses.replace(config, source="<defaults>") == Config()
    assert config.source == "empty.yaml"


@pytest.mark.parametrize(("text", "size_bytes"), [
    ("4096", 4096),
    ("1048576", 1 << 20),
    ("512B", 512),
    ("64KiB", 64 << 10),
    ("512MiB", 512 << 20),
    ("4GiB", 4 << 30),
    ("1TiB", 1 << 40),
    ("0.5GiB", 512 << 20),
    ("1 GiB", 1 << 30),
])
def test_min_available_sizes_in_every_unit(text, size_bytes):
    config = parse_config(f"lock:\n  min_available: '{text}'\n")

    assert config.lock.min_available == Size(size_bytes=size_bytes)


def test_size_as_yaml_integer():
    config = parse_config("lock:\n  budget: 8589934592\n  max_file_size: 65536\n")

    assert config.lock.budget == Size(size_bytes=8 << 30)
    assert config.lock.max_file_size_bytes == 65536


@pytest.mark.parametrize(("text", "fraction"), [("10%", 0.10), ("12.5%", 0.125), ("100%", 1.0), ("1%", 0.01)])
def test_budget_percentages(text, fraction):
    config = parse_config(f"lock:\n  budget: {text}\n")

    assert config.lock.budget == Size(fraction=fraction)


def test_min_available_zero_turns_floor_off():
    assert parse_config("lock: {min_available: 0%}").lock.min_available == Size(fraction=0.0)
    assert parse_config("lock: {min_available: 0}").lock.min_available == Size(size_bytes=0)


@pytest.mark.parametrize(("text", "seconds"), [("1500ms", 1.5), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0)])
def test_durations_in_every_unit(text, seconds):
    config = parse_config(f"scan:\n  interval: {text}\nlock:\n  linger: {text}\n")

    assert config.scan.interval_s == seconds
    assert config.lock.linger_s == seconds


def test_linger_zero_is_valid():
    assert parse_config("lock: {linger: 0s}").lock.linger_s == 0.0


def test_every_key_set():
    text = r"""
critical:
  names: [kubelet, my-agent]
  exe: [/usr/local/bin/kubelet, '/opt/*/bin/*']
  cgroups: ['^/system\.slice/kubelet\.service$']
  pod_cgroups: [kubepods]
others: false
files:
  include: ['^/usr/']
  exclude: ['\.debug$']
  kinds: all
lock:
  mode: whole-file
  budget: 2GiB
  max_file_size: 256MiB
  min_available: 1GiB
  linger: 30s
scan:
  interval: 5m
metrics:
  listen: 127.0.0.1:9464
state_dir: /run/prelock
log_level: debug
"""
    config = parse_config(text, "full.yaml")

    assert config.critical.names == ("kubelet", "my-agent")
    assert config.critical.exe == ("/usr/local/bin/kubelet", "/opt/*/bin/*")
    assert config.critical.cgroups == (re.compile(r"^/system\.slice/kubelet\.service$"),)
    assert config.critical.pod_cgroups == (re.compile("kubepods"),)
    assert config.others is False
    assert config.files.include == (re.compile("^/usr/"),)
    assert config.files.exclude == (re.compile(r"\.debug$"),)
    assert config.files.kinds == "all"
    assert config.lock.mode == "whole-file"
    assert config.lock.budget == Size(size_bytes=2 << 30)
    assert config.lock.max_file_size_bytes == 256 << 20
    assert config.lock.min_available == Size(size_bytes=1 << 30)
    assert config.lock.linger_s == 30.0
    assert config.scan.interval_s == 300.0
    assert config.metrics.listen == "127.0.0.1:9464"
    assert config.state_dir == Path("/run/prelock")
    assert config.log_level == "debug"
    assert config.source == "full.yaml"


def test_yaml_anchors_and_aliases():
    config = parse_config("critical:\n  names: &agents [kubelet]\nfiles:\n  include: *agents\n")

    assert config.critical.names == ("kubelet",)
    assert config.files.include == (re.compile("kubelet"),)


@pytest.mark.parametrize(("listen", "address"), [
    ('""', None),
    ("", None),
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    (":9464", ("", 9464)),
    ("'[::1]:9464'", ("::1", 9464)),
    ("node-1.example.com:1", ("node-1.example.com", 1)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_metrics_listen_values(listen, address):
    config = parse_config(f"metrics:\n  listen: {listen}\n")

    assert config.metrics.address == address


# --- Size ------------------------------------------------------------------------------


def test_size_resolve_fraction_of_memtotal():
    assert Size(fraction=0.10).resolve(64 * GiB) == int(6.4 * GiB)
    assert Size(size_bytes=4 * GiB).resolve(64 * GiB) == 4 * GiB


def test_size_str():
    assert str(Size(fraction=0.10)) == "10%"
    assert str(Size(fraction=0.125)) == "12.5%"
    assert str(Size(size_bytes=4 * GiB)) == "4.0GiB"


@pytest.mark.parametrize("kwargs", [{}, {"size_bytes": 1, "fraction": 0.1}])
def test_size_needs_exactly_one_value(kwargs):
    with pytest.raises(ValueError):
        Size(**kwargs)


# --- validation ----------------------------------------------------------------------


def test_every_problem_reported():
    text = "others: maybe\nlock:\n  budgt: 10%\n  mode: fast\nscan:\n  interval: 10\n"

    problems = problems_of(text)

    assert [(p.line, p.key) for p in problems] == [
        (1, "others"), (3, "lock.budgt"), (4, "lock.mode"), (6, "scan.interval")]


def test_error_message_lists_every_problem():
    with pytest.raises(ConfigError) as excinfo:
        parse_config("others: maybe\nlog_level: loud\n", "node.yaml")

    message = str(excinfo.value)
    assert excinfo.value.exit_code == ExitCode.USAGE
    assert message.splitlines()[0] == "invalid configuration in node.yaml: 2 errors"
    assert "node.yaml:1: others: not a boolean, got 'maybe'; expected true or false" in message
    assert "node.yaml:2: log_level: unknown value, got 'loud'; expected one of debug, info, warning, error" in message


def test_unknown_key_suggests_close_match():
    (problem,) = problems_of("lock:\n  budgt: 10%\n")

    assert problem.key == "lock.budgt"
    assert "did you mean budget?" in str(problem)


def test_duplicate_key_names_first_line():
    (problem,) = problems_of("scan:\n  interval: 10s\nscan:\n  interval: 20s\n")

    assert problem.line == 3
    assert "first set at line 1" in problem.problem


def test_invalid_regex_names_regex_error():
    (problem,) = problems_of("files:\n  exclude: ['ok', '[a-']\n")

    assert problem.key == "files.exclude[1]"
    assert "unterminated character set" in problem.problem


def test_yaml_syntax_error_has_line():
    (problem,) = problems_of("lock:\n  mode: working-set\n  budget: [10%\nscan: {}\n")

    assert problem.line == 4
    assert problem.problem.startswith("invalid YAML")


def test_yaml_control_character_is_error():
    (problem,) = problems_of("log_level: info\x00\n")

    assert "invalid YAML" in problem.problem


def test_yaml_nul_character_names_line_and_column():
    (problem,) = problems_of("lock:\n  mode: mapped\n  budget: 10%\x00\n")

    assert problem.line == 3
    assert "U+0000 (NUL) at column 14" in problem.problem
    assert "\n" not in str(problem)


def test_yaml_tab_says_indent_with_spaces():
    (problem,) = problems_of("lock:\n\tmode: mapped\n")

    assert problem.line == 2
    assert problem.problem.endswith("indent with spaces, not tabs")


def test_yaml_merge_key_not_supported():
    problems = problems_of("base: &base {mode: mapped}\nlock:\n  <<: *base\n  budget: 5%\n")

    merge = next(p for p in problems if p.key == "lock.<<")
    assert merge.line == 3
    assert merge.problem == "YAML merge keys (<<) are not supported"
    assert merge.expected == "the keys written out in this mapping"


@pytest.mark.parametrize("depth", [60, 600, 100_000])
def test_deep_nesting_names_key(depth):
    (problem,) = problems_of("critical: {names: " + "[" * depth + "]" * depth + "}\n")

    assert problem.key == "critical.names[0]"
    assert problem.problem.startswith("nested too deeply")
    assert problem.line == 1


def test_deep_nesting_of_mappings_names_key():
    depth = 600
    (problem,) = problems_of("lock: " + "{a: " * depth + "1" + "}" * depth + "\n")

    assert problem.key == "lock.a.a"
    assert problem.problem.startswith("nested too deeply")


def test_nesting_below_limit_reports_value():
    (problem,) = problems_of("critical: {names: " + "[" * 40 + "]" * 40 + "}\n")

    assert problem.key == "critical.names[0]"
    assert problem.problem == "invalid value"


def test_state_dir_with_nul_byte():
    (problem,) = problems_of('state_dir: "/tmp/a\\0b"\n')

    assert problem.key == "state_dir"
    assert problem.problem == "contains a NUL byte"


def test_long_values_are_shortened():
    (problem,) = problems_of(f"log_level: {'x' * 500}\n")

    assert len(str(problem)) < 250


@pytest.mark.parametrize("text", [
    "lock: {budget: '" + "9" * 400 + "'}",
    "lock: {budget: '" + "9" * 400 + "KiB'}",
    "lock: {budget: " + "9" * 400 + "}",
    "lock: {budget: 99999999999TiB}",
    "scan: {interval: '" + "9" * 400 + "s'}",
    "scan: {interval: 200h}",
])
def test_huge_numbers_rejected(text):
    (problem,) = problems_of(text)

    assert problem.key in ("lock.budget", "scan.interval")


def test_names_must_be_strings():
    problems = problems_of("critical:\n  names: [kubelet, on, 12, null]\n")

    assert [p.key for p in problems] == ["critical.names[1]", "critical.names[2]", "critical.names[3]"]


# --- reading files -------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_load_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_load_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)

    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_load_character_device():
    with pytest.raises(ConfigError, match="character device"):
        load_config("/dev/null")


def test_load_path_through_a_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("")

    with pytest.raises(ConfigError, match="not a directory"):
        load_config(plain / "prelock.yaml")


def test_load_non_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"log_level: d\xe9bug\n")

    with pytest.raises(ConfigError, match="not valid UTF-8 at byte 12"):
        load_config(path)


def test_load_oversized_file(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (config_module.MAX_CONFIG_BYTES + 1))

    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


@pytest.mark.parametrize("path", ["", "bad\0path"])
def test_load_invalid_path(path):
    with pytest.raises(ConfigError, match="config path"):
        load_config(path)


def test_load_unreadable_file(tmp_path):
    path = tmp_path / "secret.yaml"
    path.write_text("log_level: info\n")
    path.chmod(0)
    command = [sys.executable, "-c", "from prelock.cli import main; main()", "check-config", str(path)]
    if os.geteuid() == 0:
        # Root opens any file through CAP_DAC_OVERRIDE, so the child runs without it.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed, and root reads any file without it")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]

    result = subprocess.run(command, capture_output=True, text=True)

    assert result.returncode == ExitCode.USAGE
    assert f"{path}: permission denied reading the config file" in result.stderr


def test_load_none_without_default_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (str(tmp_path / "absent.yaml"),))

    assert load_config(None) == Config()


def test_load_none_reads_first_existing_default(tmp_path, monkeypatch):
    second = tmp_path / "second.yaml"
    second.write_text("log_level: warning\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (str(tmp_path / "absent.yaml"), str(second)))

    config = load_config(None)

    assert config.log_level == "warning"
    assert config.source == str(second)


def test_load_none_reports_dangling_symlink(tmp_path, monkeypatch):
    link = tmp_path / "prelock.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATHS", (str(link),))

    with pytest.raises(ConfigError, match="not found"):
        load_config(None)


def test_default_config_path():
    assert DEFAULT_CONFIG_PATHS == ("/etc/prelock/prelock.yaml",)


# --- CriticalSelector.match ----------------------------------------------------------

HOST_CGROUP = "/system.slice/kubelet.service"
POD_CGROUP = ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6789_abcd_"
              "ef0123456789.slice/cri-containerd-" + "a" * 64 + ".scope")
CGROUPFS_POD_CGROUP = "/kubepods/besteffort/pod0f1e2d3c-4b5a-6789-abcd-ef0123456789/" + "b" * 64


def test_match_name_via_comm():
    assert Config().critical.match("kubelet", None, HOST_CGROUP) == "name"


def test_match_name_via_exe_basename():
    assert Config().critical.match("kubelet-wrapper", "/usr/local/bin/kubelet", HOST_CGROUP) == "name"


def test_match_truncated_comm():
    selector = Config().critical

    assert selector.match("containerd-shim", "/usr/bin/containerd-shim-runc-v2", "/system.slice/containerd.service") == "name"
    assert selector.match("containerd-shim", None, "/system.slice/containerd.service") == "name"
    assert selector.match("systemd-journal", None, "/system.slice/systemd-journald.service") == "name"


def test_match_truncation_only_at_15_bytes():
    selector = CriticalSelector(names=("containerd-shim-runc-v2",))

    assert selector.match("containerd-shi", None, "/") is None
    assert selector.match("containerd", None, "/") is None


def test_no_match_for_other_process():
    assert Config().critical.match("python3", "/usr/bin/python3.11", "/user.slice/user-0.slice") is None


def test_match_deleted_exe():
    selector = CriticalSelector(names=(), exe=("/usr/bin/kubelet",))

    assert selector.match("kubelet", "/usr/bin/kubelet (deleted)", HOST_CGROUP) == "exe"
    assert Config().critical.match("renamed", "/usr/bin/kubelet (deleted)", HOST_CGROUP) == "name"


@pytest.mark.parametrize("cgroup", [POD_CGROUP, CGROUPFS_POD_CGROUP, "/system.slice/docker-" + "c" * 64 + ".scope",
                                    "/docker/" + "d" * 64, "/machine.slice/libpod-" + "e" * 64 + ".scope"])
def test_name_in_container_cgroup_not_critical(cgroup):
    assert Config().critical.match("kubelet", "/usr/bin/kubelet", cgroup) is None


def test_pod_process_critical_by_exe_glob():
    selector = dataclasses.replace(Config().critical, exe=("/usr/local/bin/*",))

    assert selector.match("kubelet", "/usr/local/bin/kubelet", POD_CGROUP) == "exe"


def test_pod_process_critical_by_cgroup():
    selector = dataclasses.replace(Config().critical, cgroups=(re.compile(r"kubepods-burstable-pod0f1e2d3c"),))

    assert selector.match("kubelet", "/usr/bin/kubelet", POD_CGROUP) == "cgroup"


def test_match_by_cgroup_alone():
    selector = parse_config(r"critical: {names: [], cgroups: ['^/system\.slice/kubelet\.service$']}").critical

    assert selector.match("anything", None, HOST_CGROUP) == "cgroup"
    assert selector.match("anything", None, HOST_CGROUP + "/child") is None


def test_exe_glob_star_crosses_slashes():
    selector = CriticalSelector(names=(), exe=("/opt/*",))

    assert selector.match("agent", "/opt/vendor/bin/agent", "/") == "exe"
    assert selector.match("agent", "/usr/opt/agent", "/") is None
