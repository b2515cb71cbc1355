"""Rendering of `prelock cache` reports from literal records, and its pure helpers."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

from prelock.cache import (CacheRecord, ProcessRef, ProcessScan, Query, Report, Scope, build_scope, parse_vm_locked_kib,
                           sort_records, sum_row)
from prelock.cache_render import (TABLE_COLUMNS, TERSE_COLUMNS, path_fields, printable, render_json, render_notes,
                                  render_plain_table, render_rich_table, render_terse)
from prelock.cli import main
from prelock.cli.cache import check_paths_measured, describe_unmapped, split_interval_args
from prelock.errors import PrelockError

PAGE_SIZE = 4096


def record(path: str, size_bytes: int | None, cached_pages: int | None, **fields) -> CacheRecord:
    pages = None if size_bytes is None else (size_bytes + PAGE_SIZE - 1) // PAGE_SIZE
    defaults = dict(locked_pages=0, dirty_pages=0, evicted_pages=0, recently_evicted_pages=0)
    if cached_pages is None or size_bytes is None:
        defaults = {}
    defaults.update(fields)
    return CacheRecord(path, size_bytes, pages, cached_pages, **defaults)


# Residency of a node's mapped code while it livelocked (path, size in bytes, cached pages).
LIVELOCK = [
    ("/usr/local/cloudmonitor/bin/argusagent", 114843023, 1069, "argusagent", 1),
    ("/usr/bin/kubelet", 188908296, 820, "kubelet", 1),
    ("/usr/bin/containerd-shim-runc-v2", 10158080, 629, "containerd-shim", 14),
    ("/usr/lib64/libc-2.32.so", 3299704, 311, "systemd", 212),
    ("/usr/bin/containerd", 53171440, 274, "containerd", 1),
    ("/usr/lib64/libsystemd.so.0.23.0", 1398376, 165, "systemd-journal", 9),
    ("/usr/lib64/libpython3.6m.so.1.0", 3164008, 76, "networkd-dispat", 2),
    ("/usr/lib/locale/locale-archive", 223542144, 0, "sshd", 40),
]


def livelock_records() -> list[CacheRecord]:
    records = []
    for index, (path, size_bytes, cached_pages, comm, count) in enumerate(LIVELOCK):
        processes = tuple(ProcessRef(1000 * index + n, comm) for n in range(count))
        records.append(record(path, size_bytes, cached_pages, processes=processes, evicted_pages=45301,
                              recently_evicted_pages=12000))
    return records


def make_report(records: list[CacheRecord], description: str = "files mapped by 3 processes (all processes)",
                backend: str = "cachestat") -> Report:
    scope = Scope(description, 3, len(records), len(records), 0, 0, None, {})
    return Report(PAGE_SIZE, backend, scope, records, sum_row(records), time_unix_s=0.0)


UNKNOWN = record("/usr/sbin/sshd", 906736, None, error="residency unknown: mincore(2) reports every page resident")
EMPTY = record("/var/lib/empty", 0, 0)
FIFO = CacheRecord("/run/fifo", error="not a regular file (FIFO)")


def test_table_bname_fits_100_columns():
    text = render_plain_table(make_report(livelock_records()), bname=True)
    widths = [len(line) for line in text.splitlines()[1:]]
    assert max(widths) < 100, text


def test_table_header_and_kubelet_row():
    lines = render_plain_table(make_report(livelock_records()), bname=True).splitlines()
    assert lines[0] == "files mapped by 3 processes (all processes)"
    assert lines[1].split() == list(TABLE_COLUMNS)
    kubelet = next(line for line in lines if line.startswith("kubelet "))
    assert kubelet.split() == ["kubelet", "188908296", "46121", "820", "1.778", "0", "0", "45301", "12000",
                               "kubelet"]


def test_table_numbers_right_aligned():
    lines = render_plain_table(make_report([*livelock_records(), UNKNOWN, EMPTY])).splitlines()[1:-1]
    percent_end = lines[0].index("Percent") + len("Percent")
    for line in lines[1:]:
        assert line[percent_end - 1] in "0123456789-?", line
        assert line[percent_end] == " ", line


def test_table_processes_cell_counts_others():
    lines = render_plain_table(make_report(livelock_records()), bname=True).splitlines()
    libc = next(line for line in lines if line.startswith("libc-2.32.so"))
    assert libc.endswith("systemd+211")
    shim = next(line for line in lines if line.startswith("containerd-shim-runc-v2"))
    assert shim.endswith("containerd-s+13")


def test_table_unknown_is_not_100_percent():
    text = render_plain_table(make_report([UNKNOWN]))
    row = next(line for line in text.splitlines() if line.startswith("/usr/sbin/sshd"))
    assert "100" not in row
    assert row.split()[1:5] == ["906736", "222", "?", "?"]


def test_table_empty_file_percent_dash():
    row = render_plain_table(make_report([EMPTY])).splitlines()[2]
    assert row.split() == ["/var/lib/empty", "0", "0", "0", "-", "0", "0", "0", "0"]


def test_table_sum_row_skips_unknown():
    records = livelock_records()[:2] + [UNKNOWN]
    lines = render_plain_table(make_report(records)).splitlines()
    sum_line = next(line for line in lines if line.startswith("Sum "))
    cells = sum_line.split()
    assert cells[1] == str(114843023 + 188908296 + 906736)
    assert cells[2] == str(28038 + 46121 + 222)
    assert cells[3] == str(1069 + 820)
    assert cells[4] == f"{100 * (1069 + 820) / (28038 + 46121):.3f}"
    assert cells[-2:] == ["2", "processes"]


def test_table_notes_name_reason():
    lines = render_plain_table(make_report([UNKNOWN, FIFO, EMPTY])).splitlines()
    assert "1 file not measured (not a regular file (FIFO)): /run/fifo" in lines
    unknown = next(line for line in lines if line.startswith("1 file not measured (residency unknown"))
    assert unknown.endswith("): /usr/sbin/sshd")


def test_notes_group_by_reason():
    records = [CacheRecord(f"/dev/shm/{n}", error="on tmpfs") for n in range(5)]
    assert render_notes(make_report(records)) == [
        "5 files not measured (on tmpfs): /dev/shm/0, /dev/shm/1, /dev/shm/2, ..."]


def test_table_nohdr_drops_scope_and_header():
    lines = render_plain_table(make_report([EMPTY]), header=False).splitlines()
    assert lines[0].startswith("/var/lib/empty")
    assert lines[1].startswith("Sum")


def test_table_human_sizes():
    row = render_plain_table(make_report(livelock_records()), human=True, bname=True).splitlines()[3]
    assert row.split()[:2] == ["kubelet", "180.2MiB"]


def test_table_mincore_backend_dashes():
    residency_only = record("/bin/true", 8192, 2, dirty_pages=None, evicted_pages=None,
                            recently_evicted_pages=None, locked_pages=None)
    row = render_plain_table(make_report([residency_only], backend="mincore")).splitlines()[2]
    assert row.split() == ["/bin/true", "8192", "2", "2", "100.000", "-", "-", "-", "-"]


def test_rich_table_same_cells():
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render_rich_table(make_report(livelock_records()), console, bname=True)
    text = console.file.getvalue()
    for name in TABLE_COLUMNS:
        assert name in text
    kubelet = next(line for line in text.splitlines() if "kubelet" in line and "188908296" in line)
    assert kubelet.split() == ["kubelet", "188908296", "46121", "820", "1.778", "0", "0", "45301", "12000",
                               "kubelet"]


def test_terse_header_and_quoting():
    odd = record('/srv/a,b "c".so', 4096, 1, processes=(ProcessRef(7, "x,y"), ProcessRef(9, "z")))
    text = render_terse(make_report([odd, UNKNOWN, EMPTY]))
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(TERSE_COLUMNS)
    assert rows[1] == ['/srv/a,b "c".so', "4096", "1", "1", "100.000", "0", "0", "0", "0", "7:x,y;9:z", ""]
    assert rows[2][3:5] == ["", ""]
    assert rows[2][-1].startswith("residency unknown")
    assert rows[3][4] == ""
    assert len(rows) == 4


def test_terse_nohdr_has_no_header():
    text = render_terse(make_report([EMPTY]), header=False)
    assert text == "/var/lib/empty,0,0,0,,0,0,0,0,,\n"


def test_json_is_valid_for_empty_and_unknown():
    text = render_json(make_report([EMPTY, UNKNOWN, FIFO]))
    assert "NaN" not in text
    data = json.loads(text)
    assert data["page_size"] == PAGE_SIZE
    assert data["backend"] == "cachestat"
    assert data["scope"]["description"] == "files mapped by 3 processes (all processes)"
    empty, unknown, fifo = data["files"]
    assert empty["percent"] is None
    assert empty["error"] is None
    assert unknown["cached_pages"] is None
    assert unknown["percent"] is None
    assert unknown["error"].startswith("residency unknown")
    assert fifo["size_bytes"] is None
    assert data["sum"]["unknown_files"] == 2
    assert data["sum"]["percent"] is None


def test_json_file_fields():
    data = json.loads(render_json(make_report(livelock_records())))
    kubelet = data["files"][1]
    assert set(kubelet) == {"path", "size_bytes", "pages", "cached_pages", "percent", "locked_pages",
                            "dirty_pages", "evicted_pages", "recently_evicted_pages", "processes", "error"}
    assert kubelet["pages"] == 46121
    assert kubelet["cached_pages"] == 820
    assert kubelet["percent"] == 1.778
    assert kubelet["processes"] == [{"pid": 1000, "comm": "kubelet"}]
    assert data["sum"]["cached_pages"] == sum(row[2] for row in LIVELOCK)


def test_json_one_line_when_repeating():
    text = render_json(make_report([EMPTY]), indent=None)
    assert text.count("\n") == 1
    assert json.loads(text)["files"][0]["path"] == "/var/lib/empty"


def test_printable_escapes_bytes_and_newline():
    path = b"/opt/caf\xe9\nlib.so".decode("utf-8", "surrogateescape")
    assert printable(path) == "/opt/caf\\xe9\\nlib.so"
    json.dumps(printable(path)).encode("utf-8")  # no lone surrogates left


# A name with a newline, a tab, a byte that is not UTF-8 and a literal backslash-n.
HOSTILE_NAME = b"/opt/caf\xe9\nlib\tx\\n.so"


def test_json_path_exact_for_hostile_name():
    path = os.fsdecode(HOSTILE_NAME)
    entry = json.loads(render_json(make_report([record(path, 4096, 1)])))["files"][0]

    assert entry["path"] == "/opt/caf\ufffd\nlib\tx\\n.so"
    assert bytes.fromhex(entry["path_bytes_hex"]) == HOSTILE_NAME


@pytest.mark.parametrize("raw", [b"/opt/a\nb.so", b"/opt/\xff.so", b"/opt/del\x7f.so", b"/opt/c1\xc2\x85.so"])
def test_json_hex_for_control_or_invalid_bytes(raw):
    fields = path_fields(os.fsdecode(raw))

    assert bytes.fromhex(fields["path_bytes_hex"]) == raw


@pytest.mark.parametrize("raw", [b"/usr/bin/kubelet", b"/opt/a\\nb.so", "/opt/café €.so".encode()])
def test_json_no_hex_for_printable_utf8(raw):
    assert path_fields(os.fsdecode(raw)) == {"path": raw.decode()}


def test_json_literal_backslash_differs_from_newline():
    newline = path_fields(os.fsdecode(b"/opt/a\nb"))
    backslash = path_fields(os.fsdecode(b"/opt/a\\nb"))

    assert newline["path"] != backslash["path"]


def test_table_and_terse_rows_never_break():
    path = os.fsdecode(HOSTILE_NAME)
    report = make_report([record(path, 4096, 1, processes=(ProcessRef(7, "bad\ncomm"),)), EMPTY])

    table = render_plain_table(report).splitlines()
    terse = render_terse(report).splitlines()

    assert len(table) == 5  # scope, header, two files, Sum
    assert table[2].startswith("/opt/caf\\xe9\\nlib\\tx\\n.so ")
    assert len(terse) == 3  # header, two files
    assert terse[1].startswith("/opt/caf\\xe9\\nlib\\tx\\n.so,")
    assert "7:bad\\ncomm" in terse[1]


def test_table_prints_undecodable_path():
    path = b"/opt/\xff.so (deleted)".decode("utf-8", "surrogateescape")
    text = render_plain_table(make_report([record(path, 4096, 1)]))
    text.encode("utf-8")
    assert "/opt/\\xff.so (deleted)" in text


def test_sort_cached_puts_unknown_last():
    records = [UNKNOWN, *livelock_records()[:3], FIFO]
    ordered = sort_records(records, "cached")
    assert [r.cached_pages for r in ordered] == [1069, 820, 629, None, None]
    assert ordered[-2:] == [UNKNOWN, FIFO]


def test_sort_percent_size_name():
    records = livelock_records()
    assert sort_records(records, "percent")[0].path == "/usr/lib64/libsystemd.so.0.23.0"
    assert sort_records(records, "size")[0].path == "/usr/lib/locale/locale-archive"
    assert sort_records(records, "name")[0].path == "/usr/bin/containerd"
    assert sort_records(records, None) == records


def test_scope_top_share_of_cached():
    records = livelock_records()
    listed = sort_records(records, "cached")[:2]
    scan = ProcessScan(comms={1: "a", 2: "b"})
    scan.skipped["exited"] = 1
    scope = build_scope(Query(top=2), scan, records, listed, meminfo_cached_bytes=(1069 + 820) * PAGE_SIZE * 4)
    assert scope.description.startswith("files mapped by 2 processes (all processes); "
                                         "1 process not read: 1 exited; top 2 of 8 files; ")
    assert "cached: listed files 7.4MiB (25.0%)" in scope.description
    assert scope.listed_cached_bytes == (1069 + 820) * PAGE_SIZE


def test_scope_names_pid_and_cgroup():
    scan = ProcessScan(comms={42: "kubelet"})
    assert "(PID 42)" in build_scope(Query(pids=(42,)), scan, [], [], None).description
    cgroup = build_scope(Query(cgroup_regex=re.compile("kubepods.*pod1")), scan, [], [], None)
    assert "memory cgroup matches 'kubepods.*pod1'" in cgroup.description


def test_interval_args_split():
    never = lambda path: False  # noqa: E731
    assert split_interval_args(("/bin/ls", "2", "5"), never) == (("/bin/ls",), 2.0, 5)
    assert split_interval_args(("/bin/ls", "0.5"), never) == (("/bin/ls",), 0.5, None)
    assert split_interval_args(("/bin/ls",), never) == (("/bin/ls",), None, None)
    assert split_interval_args(("3", "1", "2"), never) == (("3",), 1.0, 2)


def test_interval_args_existing_file_stays_path():
    exists = lambda path: path == "5"  # noqa: E731
    assert split_interval_args(("/bin/ls", "5"), exists) == (("/bin/ls", "5"), None, None)


@pytest.mark.parametrize("interval", ["0", "-1", "1e308", "1e400", "86401"])
def test_interval_args_out_of_range(interval):
    with pytest.raises(click.BadParameter, match="above 0 and at most 86400"):
        split_interval_args(("/bin/ls", interval, "2"), lambda path: False)


def test_interval_args_at_most_a_day():
    assert split_interval_args(("/bin/ls", "86400"), lambda path: False) == (("/bin/ls",), 86400.0, None)


def test_interval_args_invalid():
    never = lambda path: False  # noqa: E731
    with pytest.raises(click.BadParameter, match="above 0"):
        split_interval_args(("0",), never)
    with pytest.raises(click.BadParameter, match="whole number"):
        split_interval_args(("1", "2.5"), never)
    assert split_interval_args(("nan",), never) == (("nan",), None, None)


def test_vm_locked_parsed_in_kib():
    status = b"Name:\tkubelet\nVmPeak:\t  100 kB\nVmLck:\t    7816 kB\nVmPin:\t       0 kB\n"
    assert parse_vm_locked_kib(status) == 7816
    assert parse_vm_locked_kib(b"Name:\tkthreadd\nState:\tS (sleeping)\n") == 0


# Exit status and process checks ------------------------------------------------------

def path_report(records: list[CacheRecord]) -> Report:
    scope = Scope(f"{len(records)} files from {len(records)} paths", None, len(records), len(records), 0, 0, None, {})
    return Report(PAGE_SIZE, "cachestat", scope, records, sum_row(records), time_unix_s=0.0)


def test_paths_none_measured_raises():
    with pytest.raises(PrelockError, match="none of the 2 listed files could be measured") as raised:
        check_paths_measured(path_report([FIFO, UNKNOWN]))
    assert raised.value.exit_code == 1


def test_paths_one_unmeasured_raises():
    with pytest.raises(PrelockError, match="the listed file could not be measured"):
        check_paths_measured(path_report([FIFO]))


def test_paths_some_measured_pass():
    check_paths_measured(path_report([FIFO, EMPTY]))
    check_paths_measured(path_report([]))


def test_process_selection_never_raises_for_unmeasured():
    check_paths_measured(make_report([FIFO]))


def write_process(procfs, pid: int, state: str, cmdline: bytes) -> None:
    directory = procfs / str(pid)
    directory.mkdir(parents=True)
    (directory / "stat").write_bytes(f"{pid} (name) {state} 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 "
                                     "100 0 0".encode())
    (directory / "cmdline").write_bytes(cmdline)


def test_describe_unmapped_reasons(tmp_path):
    write_process(tmp_path, 40, "Z", b"")
    write_process(tmp_path, 41, "I", b"")

    assert "process 40 is a zombie" in describe_unmapped(40, str(tmp_path))
    assert describe_unmapped(41, str(tmp_path)) == "process 41 is a kernel thread, which has no mappings"
    assert describe_unmapped(42, str(tmp_path)) == "process 42 exited"


def test_procfs_root_without_meminfo_is_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["cache", "--procfs-root", str(tmp_path), "--top", "3"])

    assert result.exit_code == 2
    assert result.stdout == ""
    assert f"cannot read {tmp_path}/meminfo: No such file or directory; is --procfs-root a procfs?" in result.stderr
