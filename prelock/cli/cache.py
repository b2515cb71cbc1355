"""`prelock cache`: which files are in the page cache, which were evicted, which are locked."""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Callable

import click

from prelock import native, procfs, sysmem
from prelock.cache import SORT_KEYS, Query, Report, collect
from prelock.cache_render import render_json, render_plain_table, render_rich_table, render_terse
from prelock.cli import usage_exit
from prelock.errors import AccessDenied, PrelockError, PrivilegeError, ProcessGone
from prelock.pagecache import BACKENDS, default_backend

# A day between two listings is already far longer than any watch of the page cache.
MAX_INTERVAL_S = 86400.0

HELP = """Show how much of each file is in the page cache.

\b
Select files in one of these ways:
  prelock cache PATH...           the files given (directories with -r)
  prelock cache --pid PID         files mapped by the process
  prelock cache --cgroup REGEX    files mapped by processes whose memory cgroup
                                  path matches REGEX (re.search), e.g. one pod
  prelock cache --top N           the N files with the most cached pages among
                                  the files mapped by any process
--top N also limits the rows of the other selections. Files mapped by processes
are deduplicated by (st_dev, st_ino) and sorted by cached pages.

\b
Columns, counts in pages:
  Size      file size in bytes (-H: binary units)
  Pages     pages the file spans; Cached: pages in the page cache
  Percent   Cached / Pages; "?" when the kernel hides residency from the caller
  Locked    pages with PG_mlocked set (needs root; "-" otherwise)
  Dirty     dirty pages (cachestat backend only)
  Evicted   pages that reclaim evicted and nothing has read back since
            (cachestat backend only)
  Recent    evicted pages that would count as working set if read back now:
            a thrash signal (cachestat backend only)
  Processes the first process that maps the file and how many others do
The Sum row adds up the listed files. Its Cached and Percent leave out the files
shown with "?".

INTERVAL (seconds, above 0 and at most 86400) repeats the listing; COUNT limits the
repetitions. With PATH arguments the last one or two arguments are read as INTERVAL
and COUNT when they are numbers and no file of that name exists. --json then prints
one JSON object per line.

The exit code is 1 when PATH arguments were given and no file could be measured,
and when no process selected by --pid has mappings (a zombie or a kernel thread).
"""


@click.command("cache", help=HELP, short_help="Show page-cache residency of files.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, metavar="[PATH]... [INTERVAL [COUNT]]")
@click.option("-r", "--recursive", is_flag=True, help="List the regular files under directory arguments.")
@click.option("-p", "--pid", "pids", type=int, multiple=True, help="List files mapped by this process (repeatable).")
@click.option("-c", "--cgroup", "cgroup_regex", metavar="REGEX",
              help="List files mapped by processes whose memory cgroup path matches REGEX.")
@click.option("-t", "--top", type=click.IntRange(min=1), metavar="N",
              help="List the N files with the most cached pages (all processes, unless --pid or --cgroup).")
@click.option("-s", "--sort", "sort_by", type=click.Choice(SORT_KEYS),
              help="Sort order; default: cached for process selections, argument order for paths.")
@click.option("-b", "--backend", type=click.Choice(("auto", *BACKENDS)), default="auto", show_default=True,
              help="How residency is read; auto uses cachestat(2) where the kernel has it (Linux 6.5+).")
@click.option("-H", "--human", is_flag=True, help="Show sizes in the table in KiB, MiB and GiB.")
@click.option("--bname", is_flag=True, help="Show file names without their directories.")
@click.option("--terse", is_flag=True, help="Print comma-separated values with one header line (no Sum row).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: sizes in bytes, counts in pages of page_size.")
@click.option("--nohdr", is_flag=True, help="Omit the scope line and the header line.")
@click.option("--procfs-root", "proc_root", type=click.Path(exists=True, file_okay=False), default="/proc",
              show_default=True, metavar="DIR",
              help="Where procfs is mounted (a host /proc bind-mounted into a container, say).")
def cache(args: tuple[str, ...], recursive: bool, pids: tuple[int, ...], cgroup_regex: str | None,
          top: int | None, sort_by: str | None, backend: str, human: bool, bname: bool, terse: bool,
          as_json: bool, nohdr: bool, proc_root: str) -> None:
    paths, interval_s, count = split_interval_args(args)
    check_procfs_root(proc_root)
    query = build_query(paths, recursive, pids, cgroup_regex, top, sort_by, backend, proc_root)
    if terse and as_json:
        raise click.UsageError("--terse and --json cannot be combined; choose one output format.")
    emit = make_emitter(terse, as_json, human, bname, nohdr, repeating=interval_s is not None)

    iteration = 0
    try:
        while True:
            report = collect(query, proc_root)
            check_pids_readable(query, report)
            check_pids_mapped(query, report, proc_root)
            emit(report)
            iteration += 1
            if interval_s is None or (count is not None and iteration >= count):
                break
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return
    check_paths_measured(report)


def split_interval_args(args: tuple[str, ...],
                        exists: Callable[[str], bool] = os.path.lexists) -> tuple[tuple[str, ...], float | None, int | None]:
    """Split trailing INTERVAL [COUNT] from the PATH arguments.

    A trailing argument counts as a number only when no file of that name exists, so a
    file named "5" can still be listed.
    """
    numbers: list[str] = []
    rest = list(args)
    while rest and len(numbers) < 2 and _is_number(rest[-1]) and not exists(rest[-1]):
        numbers.insert(0, rest.pop())
    if not numbers:
        return tuple(rest), None, None

    interval_s = float(numbers[0])
    # float() reads "1e400" as inf, and time.sleep() rejects inf and 1e308 with OverflowError.
    if not math.isfinite(interval_s) or not 0 < interval_s <= MAX_INTERVAL_S:
        raise click.BadParameter(f"expected an interval in seconds above 0 and at most {MAX_INTERVAL_S:g}, "
                                 f"got {numbers[0]!r}", param_hint="INTERVAL")
    count = None
    if len(numbers) == 2:
        if not numbers[1].isdigit() or int(numbers[1]) < 1:
            raise click.BadParameter(f"expected a whole number of repetitions of at least 1, got {numbers[1]!r}",
                                     param_hint="COUNT")
        count = int(numbers[1])
    return tuple(rest), interval_s, count


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity")


def check_procfs_root(proc_root: str) -> None:
    """Exit with a usage error unless proc_root/meminfo has MemTotal, as every procfs does.

    Without this check an empty directory reads as a machine without processes.
    """
    try:
        meminfo = sysmem.read_meminfo(proc_root)
    except OSError as exc:
        problem = exc.strerror or str(exc)
    else:
        problem = None if meminfo.get("MemTotal") else "no MemTotal line"
    if problem is not None:
        usage_exit(f"cannot read {proc_root}/meminfo: {problem}; is --procfs-root a procfs?")


def build_query(paths: tuple[str, ...], recursive: bool, pids: tuple[int, ...], cgroup_regex: str | None,
                top: int | None, sort_by: str | None, backend: str, proc_root: str = "/proc") -> Query:
    """Validate the selection options and return the Query; raise click usage errors naming the value."""
    if paths and (pids or cgroup_regex is not None):
        raise click.UsageError("give either PATH arguments or --pid/--cgroup, not both.")
    if pids and cgroup_regex is not None:
        raise click.UsageError("give either --pid or --cgroup, not both.")
    if not paths and not pids and cgroup_regex is None and top is None:
        raise click.UsageError("nothing to list: give a PATH, --pid PID, --cgroup REGEX or --top N.")

    for pid in pids:
        if pid <= 0 or not os.path.isdir(f"{proc_root}/{pid}"):
            raise click.BadParameter(f"process {pid} not found; check the PID with ps.", param_hint="--pid")
    pattern = None
    if cgroup_regex is not None:
        try:
            pattern = re.compile(cgroup_regex)
        except re.error as exc:
            raise click.BadParameter(f"invalid regular expression {cgroup_regex!r}: {exc}",
                                     param_hint="--cgroup") from None

    return Query(paths=paths, recursive=recursive, pids=pids, cgroup_regex=pattern, top=top,
                 sort_by=sort_by, backend=resolve_backend(backend))


def resolve_backend(name: str) -> str:
    if name == "auto":
        return default_backend()
    if name == "cachestat" and not native.has_cachestat():
        raise click.BadParameter("cachestat(2) is not available on this kernel (it needs Linux 6.5+); "
                                 "use --backend mincore or auto.", param_hint="--backend")
    return name


def check_pids_readable(query: Query, report: Report) -> None:
    """Raise PrivilegeError when --pid named only processes whose maps were denied to us."""
    scope = report.scope
    if query.pids and scope.processes == 0 and scope.skipped_processes.get("access denied"):
        raise PrivilegeError(f"access denied to the maps of PID {', '.join(map(str, query.pids))}; "
                             "run as root or as the process owner.")


def check_pids_mapped(query: Query, report: Report, proc_root: str = "/proc") -> None:
    """Raise PrelockError when no process given with --pid has mappings, saying why for each."""
    scope = report.scope
    if not query.pids or scope.processes or scope.skipped_processes.get("access denied"):
        return
    reasons = "; ".join(describe_unmapped(pid, proc_root) for pid in query.pids)
    raise PrelockError(f"no mapped files to list: {reasons}")


def describe_unmapped(pid: int, proc_root: str = "/proc") -> str:
    """Say why process pid has no mappings: it is a zombie, a kernel thread, or it exited."""
    try:
        state = procfs.read_stat(pid, proc_root).state
        argv = procfs.read_cmdline(pid, proc_root)
    except ProcessGone:
        return f"process {pid} exited"
    except (AccessDenied, OSError, ValueError) as exc:
        return f"process {pid} has no mappings ({exc})"
    if state == "Z":
        return f"process {pid} is a zombie (it exited and its parent has not reaped it), so it has no mappings"
    # Only kernel threads have an empty command line and no mappings while they run.
    if not argv:
        return f"process {pid} is a kernel thread, which has no mappings"
    return f"process {pid} has no mappings (state {state})"


def check_paths_measured(report: Report) -> None:
    """Raise PrelockError when files were listed for PATH arguments and none could be measured.

    Scripts can then tell that nothing was measured. fincore (util-linux) is stricter and
    exits 1 when any file cannot be opened.
    """
    if report.scope.processes is not None or not report.files:
        return
    if all(record.cached_pages is None for record in report.files):
        count = len(report.files)
        failure = ("the listed file could not be measured" if count == 1
                   else f"none of the {count} listed files could be measured")
        raise PrelockError(f"{failure}; the reason for each is listed above")


def make_emitter(terse: bool, as_json: bool, human: bool, bname: bool, nohdr: bool,
                 repeating: bool) -> Callable[[Report], None]:
    """Return a function that prints one report in the chosen format."""
    if as_json:
        # One object per line when repeating, so that every line is a valid JSON document.
        indent = None if repeating else 2
        return lambda report: _write(render_json(report, indent=indent))
    if terse:
        return lambda report: _write(render_terse(report, bname=bname, header=not nohdr))
    if sys.stdout.isatty():
        from rich.console import Console
        console = Console()
        return lambda report: render_rich_table(report, console, human=human, bname=bname, header=not nohdr)

    separator = "\n" if repeating else ""
    return lambda report: _write(render_plain_table(report, human=human, bname=bname, header=not nohdr) + separator)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
