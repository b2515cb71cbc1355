"""`prelock check-config`: validate a config file and summarize what it sets."""

from __future__ import annotations

import sys

import click
import psutil

from prelock.config import DEFAULT_CONFIG_PATHS, Config, load_config, parse_config
from prelock.units import format_size


_HELP = f"""Validate a config file and print a summary of its settings.

FILE defaults to the file that `prelock run` reads, {", then ".join(DEFAULT_CONFIG_PATHS)}.
When it does not exist, the built-in defaults are checked.
FILE - reads the config from standard input.

Every error is printed to stderr with its line and key, and the exit code is 2.
A valid config whose sizes do not suit this machine (a budget larger than MemTotal,
a min_available that leaves nothing lockable) gets WARNING lines and exit code 0,
because the same file may serve nodes of other sizes.
"""


@click.command("check-config", help=_HELP)
@click.argument("file", required=False, type=click.Path(readable=False, allow_dash=True))
@click.option("-q", "--quiet", is_flag=True,
              help="Print nothing but WARNING lines (to stderr) when the config is valid.")
def check_config(file: str | None, quiet: bool) -> None:
    if file == "-":
        config = parse_config(sys.stdin.read(), "<stdin>")
    else:
        config = load_config(file)

    # psutil reports MemTotal from /proc/meminfo as the total.
    memtotal_bytes = psutil.virtual_memory().total
    if quiet:
        for warning in size_warnings(config, memtotal_bytes):
            click.echo(warning, err=True)
        return
    click.echo(format_summary(config, memtotal_bytes))


def format_summary(config: Config, memtotal_bytes: int) -> str:
    """Return the lines that describe a valid config, with sizes resolved against memtotal_bytes."""
    lock = config.lock
    critical = config.critical
    source = config.source
    if source == "<defaults>":
        source = f"built-in defaults (no file at {', '.join(DEFAULT_CONFIG_PATHS)})"
    rows = [
        ("mode", lock.mode),
        ("budget", _resolved(lock.budget, memtotal_bytes)),
        ("min_available", _resolved(lock.min_available, memtotal_bytes)),
        ("max_file_size", format_size(lock.max_file_size_bytes)),
        ("critical", f"{len(critical.names)} names, {len(critical.exe)} exe globs,"
                     f" {len(critical.cgroups)} cgroup regexes, {len(critical.pod_cgroups)} pod cgroup regexes"),
        ("others", "on" if config.others else "off"),
        ("files", f"kinds={config.files.kinds} include={len(config.files.include)}"
                  f" exclude={len(config.files.exclude)}"),
        ("interval", format_duration(config.scan.interval_s)),
        ("linger", format_duration(lock.linger_s)),
        ("metrics", config.metrics.listen or "off"),
        ("state_dir", str(config.state_dir)),
        ("log_level", config.log_level),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{source}: valid"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines += size_warnings(config, memtotal_bytes)
    return "\n".join(lines)


def size_warnings(config: Config, memtotal_bytes: int) -> list[str]:
    """Return a WARNING line for each lock size that does not suit a machine with memtotal_bytes.

    These sizes stay valid, because one config file may serve nodes of different sizes.
    """
    lock = config.lock
    budget_bytes = lock.budget.resolve(memtotal_bytes)
    floor_bytes = lock.min_available.resolve(memtotal_bytes)
    memtotal = format_size(memtotal_bytes)
    warnings = []
    if budget_bytes > memtotal_bytes:
        warnings.append(f"WARNING: lock.budget {lock.budget} is larger than MemTotal {memtotal} on this "
                        "machine, so it does not limit locking here (lock.min_available and the daemon's "
                        "cgroup memory limit still do)")
    # MemAvailable never exceeds MemTotal, so a floor at MemTotal or above is never met.
    if floor_bytes >= memtotal_bytes:
        warnings.append(f"WARNING: lock.min_available {lock.min_available} = {format_size(floor_bytes)} is at "
                        f"least MemTotal {memtotal} on this machine, so prelock locks nothing here")
    elif floor_bytes + budget_bytes > memtotal_bytes and budget_bytes <= memtotal_bytes:
        warnings.append(f"WARNING: lock.min_available {lock.min_available} plus lock.budget {lock.budget} exceed "
                        f"MemTotal {memtotal} on this machine, so here less than the budget can be locked")
    return warnings


def format_duration(seconds: float) -> str:
    """Format seconds in the largest config unit that shows them exactly: 10m, 90s, 1500ms."""
    if seconds == 0:
        return "0s"
    for unit, unit_s in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= unit_s and seconds % unit_s == 0:
            return f"{seconds / unit_s:g}{unit}"
    return f"{seconds * 1000:g}ms"


def _resolved(size, memtotal_bytes: int) -> str:
    """Show a percentage with what it means on this machine, and a size as it is."""
    if size.fraction is None:
        return str(size)
    return f"{size} of MemTotal {format_size(memtotal_bytes)} = {format_size(size.resolve(memtotal_bytes))}"
