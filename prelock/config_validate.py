"""The YAML node validator behind prelock.config.parse_config, and its converters.

Validator works on composed YAML nodes rather than loaded values, so a problem can name
the line of the node at fault. It records each problem and goes on, so one pass over a
file finds all of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from pathlib import Path
from typing import Callable

import yaml

from prelock.config import (FILE_KINDS, LOCK_MODES, LOG_LEVELS, MAX_DURATION_S, MAX_SIZE_BYTES, MIN_LOCK_SIZE_BYTES,
                            Config, ConfigProblem, CriticalSelector, FileFilter, LockSettings, MetricsSettings,
                            ScanSettings, Size)
from prelock.units import parse_duration, parse_percent, parse_size


# --- validation ----------------------------------------------------------------------

# Returned by a converter whose value was invalid; the problem is already recorded.
_INVALID = object()

_NULL_TAG = "tag:yaml.org,2002:null"
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"

# A valid config nests three levels (critical.names[0]). PyYAML composes nested lists and
# mappings recursively, about two Python frames per level, so without a bound 500 levels
# exhaust the interpreter's recursion limit (1000 by default).
MAX_NESTING_DEPTH = 50

Converter = Callable[["Validator", yaml.Node, str], object]


class NestedTooDeeply(Exception):
    """Lists and mappings that nest deeper than MAX_NESTING_DEPTH below the dotted key."""

    def __init__(self, key: str, mark: yaml.Mark | None):
        super().__init__(f"{key}: nested too deeply")
        self.key = key
        self.mark = mark


class DepthLimitedLoader(yaml.SafeLoader):
    """SafeLoader whose composer raises NestedTooDeeply instead of recursing without bound."""

    def __init__(self, stream):
        super().__init__(stream)
        # One entry per node being composed, from the root down: its key or [index].
        self._path: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        if len(self._path) > MAX_NESTING_DEPTH:
            raise NestedTooDeeply(_dotted_key(self._path), self.peek_event().start_mark)
        self._path.append(_path_component(parent, index))
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()


def _path_component(parent: yaml.Node | None, index: object) -> str:
    # The composer passes a sequence item's position, a mapping value's key node, and None
    # for the root and for a mapping key.
    if isinstance(parent, yaml.SequenceNode):
        return f"[{index}]"
    if isinstance(index, yaml.ScalarNode):
        return index.value if len(index.value) <= 40 else index.value[:37] + "..."
    return "" if parent is None else "(key)"


def _dotted_key(path: list[str], max_parts: int = 3) -> str:
    """Join the first max_parts components below the root into a key such as critical.names[0]."""
    key = ""
    for part in path[1:max_parts + 1]:
        key += part if part.startswith("[") or not key else "." + part
    return key or "(top level)"


class Validator:
    """Converter from a composed YAML node tree to settings that records every problem found."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[ConfigProblem] = []
        self._constructor = yaml.SafeLoader("")

    def compose(self, text: str) -> yaml.Node | None:
        """Return the root node, or None for an empty document or a YAML syntax error."""
        try:
            root = yaml.compose(text, Loader=DepthLimitedLoader)
        except NestedTooDeeply as exc:
            line = exc.mark.line + 1 if exc.mark is not None else None
            problem = f"nested too deeply (more than {MAX_NESTING_DEPTH} levels of lists and mappings)"
            self.problems.append(ConfigProblem(self.source, line, exc.key, problem))
            return None
        except yaml.MarkedYAMLError as exc:
            self._report_syntax_error(exc)
            return None
        except yaml.reader.ReaderError as exc:
            self._report_reader_error(exc, text)
            return None
        except yaml.YAMLError as exc:
            self.problems.append(ConfigProblem(self.source, None, "", f"invalid YAML: {exc}"))
            return None
        if isinstance(root, yaml.ScalarNode) and root.tag == _NULL_TAG:
            return None
        return root

    def _report_syntax_error(self, exc: yaml.MarkedYAMLError) -> None:
        mark = exc.problem_mark or exc.context_mark
        problem = f"invalid YAML: {exc.problem or exc.context}"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem += f" ({exc.context} started at line {exc.context_mark.line + 1})"
        if "'\\t'" in problem:
            # PyYAML reports a tab where a token or indentation starts as a character
            # "that cannot start any token".
            problem += "; indent with spaces, not tabs"
        line = mark.line + 1 if mark is not None else None
        self.problems.append(ConfigProblem(self.source, line, "", problem))

    def _report_reader_error(self, exc: yaml.reader.ReaderError, text: str) -> None:
        """Record a character that YAML forbids (such as NUL) with its line and column."""
        if isinstance(exc.character, bytes) or not 0 <= exc.position <= len(text):
            self.problems.append(ConfigProblem(self.source, None, "", f"invalid YAML: {exc.reason}"))
            return
        # For str input PyYAML checks the whole text at once, so position is an index into text.
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        name = " (NUL)" if exc.character == 0 else ""
        problem = (f"invalid YAML: character U+{exc.character:04X}{name} at column {column} is not allowed; "
                   "remove it (YAML allows no control characters other than tab and line breaks)")
        self.problems.append(ConfigProblem(self.source, line, "", problem))

    def report(self, node: yaml.Node, key: str, problem: str, expected: str = "",
               show_value: bool = True) -> object:
        """Record a problem at node and return _INVALID, so converters can `return v.report(...)`."""
        got = self.describe(node) if show_value else None
        self.problems.append(ConfigProblem(self.source, node.start_mark.line + 1, key, problem, expected, got))
        return _INVALID

    def describe(self, node: yaml.Node) -> str:
        """Return the value of node for a message: a string quoted, other scalars as written."""
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if node.tag == _NULL_TAG:
            return "no value"
        text = repr(node.value) if node.tag == _STR_TAG else node.value
        return text if len(text) <= 80 else text[:77] + "..."

    def scalar(self, node: yaml.ScalarNode, key: str) -> object:
        """Return the Python value of a scalar node, or _INVALID for an unsupported tag."""
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            return self.report(node, key, f"unsupported YAML value ({problem})", "a plain YAML value")

    def mapping(self, node: yaml.Node, key: str, allowed: list[str]) -> dict[str, yaml.Node] | None:
        """Return the entries of a mapping node by key, recording unknown and duplicate keys."""
        expected = "a mapping with the keys " + ", ".join(allowed)
        if not isinstance(node, yaml.MappingNode):
            self.report(node, key or "(top level)", "not a mapping", expected)
            return None

        entries: dict[str, yaml.Node] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.report(key_node, key or "(top level)", "invalid key", "keys that are plain strings")
                continue
            name = key_node.value
            display_name = name if len(name) <= 40 else name[:37] + "..."
            dotted = f"{key}.{display_name}" if key else display_name
            if key_node.tag == _MERGE_TAG:
                self.report(key_node, dotted, "YAML merge keys (<<) are not supported",
                            "the keys written out in this mapping", show_value=False)
            elif name not in allowed:
                self._report_unknown_key(key_node, dotted, allowed)
            elif name in entries:
                self.report(key_node, dotted, f"duplicate key, first set at line {key_lines[name]}",
                            "each key once", show_value=False)
            else:
                entries[name] = value_node
                key_lines[name] = key_node.start_mark.line + 1
        return entries

    def _report_unknown_key(self, key_node: yaml.Node, dotted: str, allowed: list[str]) -> None:
        expected = "one of " + ", ".join(allowed)
        close = difflib.get_close_matches(key_node.value, allowed, n=1)
        if close:
            expected += f" (did you mean {close[0]}?)"
        self.report(key_node, dotted, "unknown key", expected, show_value=False)

    def build_section(self, node: yaml.Node, key: str, cls: type, fields: dict[str, tuple[str, Converter]]):
        """Return cls built from a mapping node; keys absent or invalid keep cls's defaults."""
        entries = self.mapping(node, key, list(fields))
        kwargs = {}
        for name, value_node in (entries or {}).items():
            attribute, convert = fields[name]
            dotted = f"{key}.{name}" if key else name
            value = convert(self, value_node, dotted)
            if value is not _INVALID:
                kwargs[attribute] = value
        return cls(**kwargs)

    def build_config(self, root: yaml.Node) -> Config:
        config = self.build_section(root, "", Config, _CONFIG_FIELDS)
        return dataclasses.replace(config, source=self.source)


# --- converters: each returns the converted value, or _INVALID after reporting --------


def _to_scalar(v: Validator, node: yaml.Node, key: str, expected: str) -> object:
    if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
        return v.report(node, key, "invalid value", expected)
    return v.scalar(node, key)


def _to_string(v: Validator, node: yaml.Node, key: str, expected: str) -> object:
    value = _to_scalar(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if not isinstance(value, str):
        return v.report(node, key, "not a string", expected + " (quote values that YAML reads as numbers or booleans)")
    return value


def _to_bool(v: Validator, node: yaml.Node, key: str) -> object:
    value = _to_scalar(v, node, key, "true or false")
    if value is _INVALID:
        return _INVALID
    if not isinstance(value, bool):
        return v.report(node, key, "not a boolean", "true or false, unquoted")
    return value


def _choice(options: tuple[str, ...]) -> Converter:
    expected = "one of " + ", ".join(options)

    def convert(v: Validator, node: yaml.Node, key: str) -> object:
        value = _to_string(v, node, key, expected)
        if value is _INVALID:
            return _INVALID
        if value not in options:
            return v.report(node, key, "unknown value", expected)
        return value

    return convert


def _string_list(check_item: Callable[[Validator, yaml.Node, str, str], object], item_expected: str,
                 example: str) -> Converter:
    """Return a converter for a list of strings that check_item converts or reports."""

    def convert(v: Validator, node: yaml.Node, key: str) -> object:
        if not isinstance(node, yaml.SequenceNode):
            return v.report(node, key, "not a list", f"a list such as {example}, or [] for none")
        items = []
        for index, item_node in enumerate(node.value):
            item_key = f"{key}[{index}]"
            text = _to_string(v, item_node, item_key, item_expected)
            if text is _INVALID:
                continue
            item = check_item(v, item_node, item_key, text)
            if item is not _INVALID:
                items.append(item)
        if len(items) != len(node.value):
            return _INVALID
        return tuple(items)

    return convert


def _check_name(v: Validator, node: yaml.Node, key: str, name: str) -> object:
    expected = _NAME
    if not name.strip():
        return v.report(node, key, "empty name", expected)
    if "/" in name or "\0" in name:
        return v.report(node, key, "a process name cannot contain '/' or NUL",
                        expected + " (put executable paths under critical.exe)")
    return name


def _check_exe_glob(v: Validator, node: yaml.Node, key: str, glob: str) -> object:
    # Executable paths are absolute, so a glob that starts with neither '/' nor '*' never matches.
    if not glob.startswith(("/", "*")):
        return v.report(node, key, "not an absolute path glob", _EXE_GLOB + " or /opt/*/bin/*")
    return glob


def _check_regex(v: Validator, node: yaml.Node, key: str, pattern: str) -> object:
    if not pattern:
        return v.report(node, key, "empty regex, which matches everything", "a non-empty regular expression")
    try:
        return re.compile(pattern)
    except re.error as exc:
        return v.report(node, key, f"invalid regex: {exc.msg} at position {exc.pos}",
                        "a Python regular expression (re module syntax)")


def _parse_size_value(v: Validator, node: yaml.Node, key: str, allow_percent: bool) -> object:
    """Convert '4GiB', '10%' (when allowed) or an integer byte count into a Size."""
    if allow_percent:
        expected = "a percentage of MemTotal such as 10%, or a size such as 512MiB (units KiB, MiB, GiB, TiB)"
    else:
        expected = "a size such as 512MiB or 1GiB (units KiB, MiB, GiB, TiB)"
    value = _to_scalar(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return v.report(node, key, "invalid size", expected)

    if isinstance(value, str):
        fraction = parse_percent(value)
        if fraction is not None and not allow_percent:
            return v.report(node, key, "a percentage is not allowed here", expected)
        if fraction is not None:
            return Size(fraction=fraction)
        try:
            value = parse_size(value)
        except (ValueError, OverflowError):  # OverflowError: a number too long for a float
            return v.report(node, key, "invalid size", expected)

    if value < 0:
        return v.report(node, key, "negative size", expected)
    if value > MAX_SIZE_BYTES:
        return v.report(node, key, "too large", expected + ", below 8EiB")
    return Size(size_bytes=value)


MIN_BUDGET_FRACTION = 0.00001


def _to_budget(v: Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=True)
    if size is _INVALID:
        return _INVALID
    # 0.001 % of a 1 TiB node is 10 MiB; anything smaller is a typo, not a budget.
    if size.fraction is not None and not MIN_BUDGET_FRACTION <= size.fraction <= 1:
        return v.report(node, key, "out of range", "a percentage from 0.001% to 100%")
    if size.size_bytes is not None and size.size_bytes < MIN_LOCK_SIZE_BYTES:
        return v.report(node, key, "too small to lock anything", "at least 4KiB, or a percentage such as 10%")
    return size


def _to_min_available(v: Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=True)
    if size is _INVALID:
        return _INVALID
    if size.fraction is not None and size.fraction > 1:
        return v.report(node, key, "out of range", "a percentage from 0% to 100%")
    return size


def _to_file_size(v: Validator, node: yaml.Node, key: str) -> object:
    size = _parse_size_value(v, node, key, allow_percent=False)
    if size is _INVALID:
        return _INVALID
    if size.size_bytes < MIN_LOCK_SIZE_BYTES:
        return v.report(node, key, "too small to lock anything", "at least 4KiB, such as 1GiB")
    return size.size_bytes


def _duration(min_s: float) -> Converter:
    expected = (f"a duration from {min_s:g}s to {MAX_DURATION_S / 3600:g}h"
                " with a unit: ms, s, m or h (such as 60s or 10m)")

    def convert(v: Validator, node: yaml.Node, key: str) -> object:
        value = _to_scalar(v, node, key, expected)
        if value is _INVALID:
            return _INVALID
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return v.report(node, key, "missing unit", expected)
        if not isinstance(value, str):
            return v.report(node, key, "invalid duration", expected)
        try:
            seconds = parse_duration(value)
        except ValueError:
            return v.report(node, key, "invalid duration", expected)
        if not min_s <= seconds <= MAX_DURATION_S:
            return v.report(node, key, "out of range", expected)
        return seconds

    return convert


_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _to_listen(v: Validator, node: yaml.Node, key: str) -> object:
    expected = "host:port such as 127.0.0.1:9464, [::1]:9464 or :9464 (port 1-65535), or \"\" for off"
    if isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG:
        return None
    value = _to_string(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if value == "":
        return None

    host, colon, port = value.rpartition(":")
    if not colon or not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        return v.report(node, key, "invalid port", expected)
    if not _is_valid_host(host):
        return v.report(node, key, "invalid host", expected + "; IPv6 addresses go in brackets")
    return value


def _is_valid_host(host: str) -> bool:
    if host == "":
        return True
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return ":" not in host and _HOSTNAME_RE.fullmatch(host) is not None


def _to_state_dir(v: Validator, node: yaml.Node, key: str) -> object:
    expected = "an absolute directory path such as /var/lib/prelock"
    value = _to_string(v, node, key, expected)
    if value is _INVALID:
        return _INVALID
    if "\0" in value:
        return v.report(node, key, "contains a NUL byte", expected)
    if not value.startswith("/"):
        return v.report(node, key, "not an absolute path", expected)
    return Path(value)


def _section(cls: type, fields: dict[str, tuple[str, Converter]]) -> Converter:
    def convert(v: Validator, node: yaml.Node, key: str) -> object:
        return v.build_section(node, key, cls, fields)

    return convert


_NAME = "a process name such as kubelet"
_EXE_GLOB = "an executable path glob such as /usr/local/bin/kubelet"
_REGEX = "a regular expression"

_CRITICAL_FIELDS: dict[str, tuple[str, Converter]] = {
    "names": ("names", _string_list(_check_name, _NAME, "[kubelet, sshd]")),
    "exe": ("exe", _string_list(_check_exe_glob, _EXE_GLOB, "[/usr/local/bin/kubelet]")),
    "cgroups": ("cgroups", _string_list(_check_regex, _REGEX, r"['^/system\.slice/kubelet\.service$']")),
    "pod_cgroups": ("pod_cgroups", _string_list(_check_regex, _REGEX, "[kubepods]")),
}
_FILES_FIELDS: dict[str, tuple[str, Converter]] = {
    "include": ("include", _string_list(_check_regex, _REGEX, "['^/usr/']")),
    "exclude": ("exclude", _string_list(_check_regex, _REGEX, r"['\.debug$']")),
    "kinds": ("kinds", _choice(FILE_KINDS)),
}
_LOCK_FIELDS: dict[str, tuple[str, Converter]] = {
    "mode": ("mode", _choice(LOCK_MODES)),
    "budget": ("budget", _to_budget),
    "max_file_size": ("max_file_size_bytes", _to_file_size),
    "min_available": ("min_available", _to_min_available),
    "linger": ("linger_s", _duration(0.0)),
}
_SCAN_FIELDS: dict[str, tuple[str, Converter]] = {
    "interval": ("interval_s", _duration(1.0)),
}
_METRICS_FIELDS: dict[str, tuple[str, Converter]] = {
    "listen": ("listen", _to_listen),
}
_CONFIG_FIELDS: dict[str, tuple[str, Converter]] = {
    "critical": ("critical", _section(CriticalSelector, _CRITICAL_FIELDS)),
    "others": ("others", _to_bool),
    "files": ("files", _section(FileFilter, _FILES_FIELDS)),
    "lock": ("lock", _section(LockSettings, _LOCK_FIELDS)),
    "scan": ("scan", _section(ScanSettings, _SCAN_FIELDS)),
    "metrics": ("metrics", _section(MetricsSettings, _METRICS_FIELDS)),
    "state_dir": ("state_dir", _to_state_dir),
    "log_level": ("log_level", _choice(LOG_LEVELS)),
}
