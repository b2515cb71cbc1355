"""`prelock bench thrash`: run the thrash scenario and render its records."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

import prelock.bench as thrash
from prelock import native
from prelock.errors import ConfigError
from prelock.units import format_size, parse_size

# Default sizes of the two working sets as fractions of --limit: 192MiB and 96MiB at the
# default 512MiB limit, which leaves the hog room to leak before reclaim starts.
CRITICAL_SHARE_OF_LIMIT = 3 / 8
HOG_SHARE_OF_LIMIT = 3 / 16
# An hour per mode or for the baseline is far beyond any useful run, so a larger value is a typo.
MAX_PHASE_SECONDS = 3600.0


@click.group("bench")
def bench() -> None:
    """Measure what locking changes when memory runs out."""


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def _leak_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    leak_bytes = _size(ctx, param, value)
    # A hog that leaks nothing never fills the cgroup, so the mode would only measure idle time.
    if leak_bytes < native.PAGE_SIZE:
        raise click.BadParameter(f"{value!r} is less than one page ({native.PAGE_SIZE} bytes): the hog must leak "
                                 "memory to fill the cgroup", ctx, param)
    return leak_bytes


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # click's FloatRange lets NaN through, because every comparison with NaN is false, and
    # a NaN limit would never end the mode.
    if not math.isfinite(value) or not 1 <= value <= MAX_PHASE_SECONDS:
        raise click.BadParameter(f"{value:g} is not a number of seconds from 1 to {MAX_PHASE_SECONDS:g}",
                                 ctx, param)
    return value


def default_sizes(limit_bytes: int, critical_bytes: int | None, hog_bytes: int | None) -> tuple[int, int]:
    """Return the working-set sizes, filling a size not given in as its share of limit_bytes.

    The shares are rounded down to whole pages.
    """
    def share(fraction: float) -> int:
        return int(limit_bytes * fraction) // native.PAGE_SIZE * native.PAGE_SIZE

    if critical_bytes is None:
        critical_bytes = share(CRITICAL_SHARE_OF_LIMIT)
    if hog_bytes is None:
        hog_bytes = share(HOG_SHARE_OF_LIMIT)
    return critical_bytes, hog_bytes


def _modes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in value.split(",") if mode.strip())
    if not modes or any(mode not in thrash.MODES for mode in modes):
        raise click.BadParameter(f"{value!r}: expected a comma-separated list of {', '.join(thrash.MODES)}",
                                 ctx, param)
    return modes


@bench.command("thrash")
@click.option("--limit", "limit_bytes", default="512MiB", show_default=True, callback=_size,
              help="Memory limit of the bench cgroup (KiB, MiB, GiB).")
@click.option("--critical-size", "critical_bytes", default=None, callback=_size,
              show_default="3/8 of --limit, 192MiB at 512MiB",
              help="File-backed working set the critical process reads every heartbeat.")
@click.option("--hog-size", "hog_bytes", default=None, callback=_size,
              show_default="3/16 of --limit, 96MiB at 512MiB", help="Size of the hog's code file.")
@click.option("--leak", "leak_bytes", default="4MiB", show_default=True, callback=_leak_size,
              help="Anonymous memory the hog leaks per pass, at least one page (4KiB).")
@click.option("--modes", default=",".join(thrash.DEFAULT_MODES), show_default=True, callback=_modes,
              help="Comma-separated modes to run, in order: none, critical, all, vmtouch.")
@click.option("--with-vmtouch", is_flag=True,
              help="Add the vmtouch mode: `vmtouch -l` locks both files whole.")
@click.option("--max-seconds", type=float, default=90.0, show_default=True, callback=_seconds,
              help="Maximum time a mode runs after the hog starts, in seconds (1 to 3600).")
@click.option("--baseline-seconds", type=float, default=10.0, show_default=True, callback=_seconds,
              help="Duration of the idle baseline (critical process alone), in seconds (1 to 3600).")
@click.option("--lock-scope", type=click.Choice(thrash.LOCK_SCOPES), default="bench", show_default=True,
              help="bench: the daemon locks only the bench files. machine: in mode all it also locks "
                   "the code of every other process on the machine, as the shipped defaults do.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, exists=True), default=None,
              help="Disk-backed directory for the bench files (default: the temporary directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw heartbeat latency over time per mode into this PNG file (needs matplotlib).")
def thrash_command(limit_bytes: int, critical_bytes: int | None, hog_bytes: int | None, leak_bytes: int,
                   modes: tuple[str, ...], with_vmtouch: bool, max_seconds: float, baseline_seconds: float,
                   lock_scope: str, directory: str | None, as_json: bool, plot_path: str | None) -> None:
    """Fill a memory cgroup and compare no locking with prelock's locking.

    In each mode a critical process reads its working set every 50 ms while a hog leaks
    memory in the same cgroup. Without locking the hog typically lives on while the
    critical process stalls on refaults; with locking the OOM killer ends the hog.
    Needs root and a memory cgroup controller (exit code 3 otherwise).

    Sizes not given follow --limit: --critical-size defaults to 3/8 of it and
    --hog-size to 3/16, so a smaller limit scales both down.
    """
    if with_vmtouch and "vmtouch" not in modes:
        modes = (*modes, "vmtouch")
    if plot_path is not None:
        _check_matplotlib()
    critical_bytes, hog_bytes = default_sizes(limit_bytes, critical_bytes, hog_bytes)
    settings = thrash.ThrashSettings(limit_bytes=limit_bytes, critical_bytes=critical_bytes,
                                     hog_bytes=hog_bytes, leak_bytes=leak_bytes, modes=modes,
                                     max_seconds=max_seconds, baseline_seconds=baseline_seconds,
                                     lock_scope=lock_scope, directory=directory)

    console = Console(stderr=True)
    if not console.is_terminal:
        # Off a terminal rich assumes 80 columns, too few for the progress lines.
        console = Console(stderr=True, width=100)
    with _sigterm_as_interrupt():
        try:
            with _progress_display(console) as on_progress:
                report = thrash.run_thrash(settings, on_progress)
        except KeyboardInterrupt:
            console.print("prelock: bench interrupted; its cgroups, files and processes were removed")
            raise SystemExit(130) from None

    if as_json:
        click.echo(json.dumps(thrash.report_to_json(report), indent=2))
    else:
        # The table needs up to 100 columns.
        output = Console()
        if not output.is_terminal:
            output = Console(width=100)
        output.print(render_table(report))
    for result in report.modes:
        for warning in result.warnings:
            console.print(f"warning: {result.mode}: {warning}")
    if plot_path is not None:
        plot_heartbeats(report, plot_path)
        console.print(f"plot written to {plot_path}")


def _check_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        # pip of the interpreter that runs prelock installs into the right environment,
        # such as the venv that the install script creates.
        pip = os.path.join(os.path.dirname(sys.executable), "pip")
        raise ConfigError(f"--plot needs matplotlib, which is not installed: run {pip} install matplotlib "
                          "(or pip install 'prelock[plot]' where prelock was installed with pip)")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the bench removes what it created before exiting."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _progress_display(console: Console) -> Iterator[thrash.ProgressCallback]:
    columns = (TextColumn("{task.fields[phase]:<9}"), BarColumn(bar_width=24), TimeElapsedColumn(),
               TextColumn("{task.fields[detail]}"))
    progress = Progress(*columns, console=console, transient=False)
    tasks: dict[str, tuple[TaskID, float]] = {}  # phase -> (task, total seconds)

    def on_progress(update: thrash.Progress) -> None:
        if update.phase not in tasks:
            if not tasks:
                # The display starts with the first phase, because a display stopped before
                # it showed anything still prints an empty line ahead of any error message.
                progress.start()
            # A new phase starts only after the previous one ended, so mark those finished.
            for task_id, total_s in tasks.values():
                progress.update(task_id, completed=total_s)
            task_id = progress.add_task("", total=update.total_s, phase=update.phase, detail="")
            tasks[update.phase] = (task_id, update.total_s)
        progress.update(tasks[update.phase][0], completed=min(update.elapsed_s, update.total_s),
                        detail=_progress_detail(update))

    try:
        yield on_progress
        for task_id, total_s in tasks.values():
            progress.update(task_id, completed=total_s)
    finally:
        if tasks:
            progress.stop()


def _progress_detail(update: thrash.Progress) -> str:
    heartbeat = "-" if update.last_heartbeat_s is None else f"{update.last_heartbeat_s * 1000:.0f}ms"
    detail = f"cgroup {format_size(update.usage_bytes)}  heartbeat {heartbeat}"
    if update.phase != "baseline":
        state = "running" if update.hog_alive else "gone"
        detail += f"  hog {state}, leaked {format_size(update.hog_leaked_bytes)}"
    return detail


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def hog_cell(result: thrash.ModeResult) -> str:
    if result.hog_killed:
        return f"OOM-killed at {result.hog_end_s:.1f}s"
    if result.hog_exit == "alive":
        return f"alive at {result.hog_end_s:.0f}s"
    return f"{result.hog_exit} at {result.hog_end_s:.1f}s"


def render_table(report: thrash.ThrashReport) -> Table:
    """Return one row per mode, after the idle baseline; fits in 100 columns."""
    title = f"prelock bench thrash: cgroup limit {format_size(report.settings.limit_bytes)}, times from the hog's start"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("mode", "hog", "p50 ms", "p99 ms", "max ms", "p99/idle", "majflt", "read", "locked"):
        table.add_column(name, justify="left" if name in ("mode", "hog") else "right", no_wrap=True)

    baseline = report.baseline
    if baseline is not None:
        table.add_row("idle", "-", _ms(baseline.p50_s), _ms(baseline.p99_s), _ms(baseline.max_s),
                      "1.0", "-", "-", "-")
    for result in report.modes:
        heartbeat = result.heartbeat
        ratio = "-"
        if baseline is not None and baseline.p99_s > 0 and not math.isnan(heartbeat.p99_s):
            ratio = f"{heartbeat.p99_s / baseline.p99_s:.1f}"
        table.add_row(result.mode, hog_cell(result), _ms(heartbeat.p50_s), _ms(heartbeat.p99_s),
                      _ms(heartbeat.max_s), ratio, str(result.critical_major_faults),
                      format_size(result.critical_read_bytes), format_size(result.locked_bytes))
    return table


def plot_heartbeats(report: thrash.ThrashReport, path: str) -> None:
    """Draw heartbeat latency over time, one line per mode, with each OOM kill marked."""
    import matplotlib

    matplotlib.use("Agg")
    # Building the font cache on first use logs at INFO, which would clutter the output.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 5.5))
    for result in report.modes:
        if not result.samples:
            continue
        times = [start for start, _ in result.samples]
        latencies_ms = [duration * 1000 for _, duration in result.samples]
        (line,) = axes.plot(times, latencies_ms, linewidth=1, label=f"{result.mode}: {hog_cell(result)}")
        if result.hog_killed:
            axes.axvline(result.hog_end_s, color=line.get_color(), linestyle=":", linewidth=1.5)
    if report.baseline is not None and not math.isnan(report.baseline.p99_s):
        axes.axhline(report.baseline.p99_s * 1000, color="grey", linestyle="--", linewidth=1,
                     label=f"idle baseline p99 ({report.baseline.p99_s * 1000:.1f} ms)")

    axes.plot([], [], color="black", linestyle=":", linewidth=1.5, label="OOM kill of the hog (mode's colour)")
    axes.set_yscale("log")
    axes.set_xlabel("seconds since the hog started")
    axes.set_ylabel("heartbeat latency (ms, log scale)")
    settings = report.settings
    axes.set_title(f"prelock bench thrash: cgroup limit {format_size(settings.limit_bytes)}, working set "
                   f"{format_size(settings.critical_bytes)}, hog code {format_size(settings.hog_bytes)}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
