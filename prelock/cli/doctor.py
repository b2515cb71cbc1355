"""`prelock doctor`: where the node's memory went, whether it thrashes, and what to change.

The report is rendered as tables (rich on a terminal, plain text otherwise) or as
JSON. The JSON fields are documented in docs/doctor.md. Keep the two in step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import textwrap

import click

from prelock import doctor as analysis
from prelock.cli import usage_exit
from prelock.cli.options import config_option
from prelock.cli.render import print_table
from prelock.config import load_config
from prelock.doctor_snapshot import meminfo_problem
from prelock.errors import ConfigError, PrelockError

logger = logging.getLogger(__name__)

JSON_SCHEMA_VERSION = 1
UNACCOUNTED_LABEL = "unaccounted (kernel or driver allocations)"
TEXT_WIDTH = 96
GIB = analysis.GIB
# The rates average over the whole interval, so an interval above an hour is more likely a typo.
MAX_INTERVAL_S = 3600.0


def _check_interval(ctx: click.Context, param: click.Parameter, value: float) -> float:
    # click's FloatRange lets NaN through (every comparison with NaN is false) and accepts
    # inf and 1e308, which time.sleep() rejects with OverflowError.
    if not math.isfinite(value) or not 0 <= value <= MAX_INTERVAL_S:
        raise click.BadParameter(f"{value:g} is not a number of seconds from 0 to {MAX_INTERVAL_S:g}", ctx, param)
    return value


@click.command("doctor")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (sizes in bytes, plus GiB and %).")
@click.option("--interval", "interval_s", type=float, default=5.0, show_default=True, callback=_check_interval,
              metavar="SECONDS",
              help=f"Seconds over which to sample refaults, faults, reclaim and PSI, from 0 to {MAX_INTERVAL_S:g} "
                   "(0 skips the sampling).")
@click.option("--procfs-root", type=click.Path(exists=True, file_okay=False), default="/proc", show_default=True,
              metavar="DIR", help="procfs to read, for example a directory of fixture files.")
@click.option("--sysfs-root", type=click.Path(exists=True, file_okay=False), default="/sys", show_default=True,
              metavar="DIR", help="sysfs to read (kernel/mm/lru_gen and the memory cgroups under fs/cgroup).")
def doctor(config_path: str | None, as_json: bool, interval_s: float, procfs_root: str, sysfs_root: str) -> None:
    """Show where the node's memory went, whether it thrashes, and what to change.

    The daemon's status file is looked up in the state_dir of the config (-c) and in
    /run/prelock and /var/lib/prelock.
    """
    problem = meminfo_problem(procfs_root)
    if problem is not None:
        usage_exit(f"cannot read {procfs_root}/meminfo: {problem}; is --procfs-root a procfs?")
    # The daemon's status files belong to the live system, so a fixture procfs skips them.
    live = os.path.realpath(procfs_root) == "/proc"
    state_dirs = status_directories(config_path) if live else None
    report = analysis.collect(procfs_root, sysfs_root, interval_s, state_dirs)

    if as_json:
        click.echo(json.dumps(report_record(report), indent=2, allow_nan=False))
    else:
        render_report(report)

    if report.breakdown is None:
        meminfo = next(source for source in report.snapshot.sources if source.name == "meminfo")
        raise PrelockError(f"cannot use {meminfo.path}: {meminfo.error}. The breakdown and the verdict "
                           "need it, so check --procfs-root.")


def status_directories(config_path: str | None) -> tuple[str, ...]:
    """Return the config's state_dir followed by the usual state directories, each once.

    An explicit config that cannot be loaded stops the command. The default config is
    only a hint here, so when it is invalid the usual directories are searched alone.
    """
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        if config_path is not None:
            raise
        logger.warning("state_dir of the default config not searched: %s", exc)
        return analysis.STATE_DIRS
    return tuple(dict.fromkeys((str(config.state_dir), *analysis.STATE_DIRS)))


# JSON


def size_record(size_bytes: int | None, total_bytes: int | None) -> dict | None:
    """Return bytes with the derived GiB and percent of MemTotal (None without a total)."""
    if size_bytes is None:
        return None
    percent = round(size_bytes / total_bytes * 100, 2) if total_bytes else None
    return {"bytes": size_bytes, "gib": round(size_bytes / GIB, 3), "percent_of_total": percent}


def report_record(report: analysis.Report) -> dict:
    """Return the whole report as a JSON-ready dict with no NaN or infinity."""
    total = report.breakdown.total_bytes if report.breakdown else None
    snapshot = report.snapshot
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "procfs_root": report.procfs,
        "sysfs_root": report.sysfs,
        "page_size": report.page_size,
        "verdict": verdict_record(report.verdict),
        "breakdown": breakdown_record(report.breakdown),
        "holders": [holder_record(holder, report.breakdown) for holder in report.holders],
        "slab_top": [
            {"name": slab.name, "active_objects": slab.active_objects, "object_size_bytes": slab.object_size_bytes,
             **size_record(slab.size_bytes, total)}
            for slab in report.top_slabs
        ],
        "rates": rates_record(report.rates),
        "rates_note": report.rates_note,
        "pressure": {resource: pressure_record(pressure) for resource, pressure in snapshot.pressure.items()},
        "swap": swap_record(snapshot, total),
        "mglru": mglru_record(snapshot.lru_gen),
        "sysctls": dict(snapshot.sysctls),
        "cgroups": cgroups_record(report.cgroups, total),
        "protection": protection_record(report.protection, total),
        "recommendations": [
            {"key": item.key, "title": item.title, "reason": item.reason, "commands": list(item.commands),
             "note": item.note}
            for item in report.recommendations
        ],
        "sources": [
            {"name": source.name, "path": source.path, "available": source.available, "error": source.error}
            for source in snapshot.sources
        ],
    }


def verdict_record(verdict: analysis.Verdict) -> dict:
    return {
        "state": verdict.state,
        "note": verdict.note,
        "rules": [
            {"key": rule.key, "verdict": rule.verdict, "condition": rule.condition, "observed": rule.observed,
             "fired": rule.fired}
            for rule in verdict.rules
        ],
    }


def breakdown_record(breakdown: analysis.Breakdown | None) -> dict | None:
    if breakdown is None:
        return None
    total = breakdown.total_bytes

    def rows(categories: tuple[analysis.Category, ...]) -> list[dict]:
        return [{"key": c.key, "label": c.label, "formula": c.formula, **size_record(c.size_bytes, total)}
                for c in categories]

    return {
        "total": size_record(total, total),
        "available": size_record(breakdown.available_bytes, total),
        "categories": rows(breakdown.categories),
        "accounted": size_record(total - breakdown.unaccounted_bytes, total),
        "unaccounted": {"label": UNACCOUNTED_LABEL, **size_record(breakdown.unaccounted_bytes, total)},
        "details": rows(breakdown.details),
    }


def holder_record(holder: analysis.Holder, breakdown: analysis.Breakdown | None) -> dict:
    total = breakdown.total_bytes if breakdown else None
    share = None
    if holder.estimate_bytes is not None and breakdown is not None and breakdown.unaccounted_bytes > 0:
        share = round(holder.estimate_bytes / breakdown.unaccounted_bytes * 100, 2)
    return {
        "kind": holder.kind,
        "name": holder.name,
        "description": holder.description,
        "estimate": size_record(holder.estimate_bytes, total),
        "percent_of_unaccounted": share,
        "method": holder.method,
        "device_files": holder.device_files,
    }


def rates_record(rates: analysis.Rates | None) -> dict | None:
    if rates is None:
        return None
    return {
        "interval_s": round(rates.interval_s, 3),
        "refaults_file_per_s": _round(rates.refaults_file_per_s),
        "major_faults_per_s": _round(rates.major_faults_per_s),
        "pages_scanned_per_s": _round(rates.pages_scanned_per_s),
        "pages_stolen_per_s": _round(rates.pages_stolen_per_s),
        "psi_percent": {name: _round(value) for name, value in rates.psi_percent.items()},
    }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def pressure_record(pressure) -> dict:
    def line(item) -> dict | None:
        if item is None:
            return None
        return {"avg10": item.avg10, "avg60": item.avg60, "avg300": item.avg300, "total_us": item.total_us}

    return {"some": line(pressure.some), "full": line(pressure.full)}


def swap_record(snapshot: analysis.Snapshot, total: int | None) -> dict:
    meminfo = snapshot.meminfo or {}
    swap_total, swap_free = meminfo.get("SwapTotal"), meminfo.get("SwapFree")
    return {
        "total": size_record(swap_total, total),
        "free": size_record(swap_free, total),
        "areas": None if snapshot.swaps is None else [
            {"path": area.path, "type": area.kind, "size_bytes": area.size_bytes, "used_bytes": area.used_bytes,
             "priority": area.priority}
            for area in snapshot.swaps
        ],
    }


def mglru_record(lru_gen) -> dict:
    if lru_gen is None:
        return {"available": False, "enabled": None, "enabled_mask": None, "min_ttl_ms": None}
    return {"available": True, "enabled": lru_gen.enabled, "enabled_mask": lru_gen.enabled_mask,
            "min_ttl_ms": lru_gen.min_ttl_ms}


def cgroups_record(cgroups: analysis.CgroupState, total: int | None) -> dict:
    return {
        "version": cgroups.version,
        "mount": cgroups.mount,
        "note": cgroups.note,
        "groups": [
            {"name": group.name, "path": group.path, "usage": size_record(group.usage_bytes, total),
             "limit": size_record(group.limit_bytes, total), "anon_bytes": group.anon_bytes,
             "file_bytes": group.file_bytes, "kernel_bytes": group.kernel_bytes}
            for group in cgroups.groups
        ],
    }


def protection_record(protection: analysis.Protection, total: int | None) -> dict:
    kubelet = protection.kubelet
    return {
        "daemon_pids": list(protection.daemon_pids),
        "status_files": [
            {"path": item.path, "pid": item.pid, "locked_bytes": item.locked_bytes,
             "age_s": _round(item.age_s, 1), "error": item.error}
            for item in protection.status_files
        ],
        "status_note": protection.status_note,
        "mlocked": size_record(protection.mlocked_bytes, total),
        "kubelet": {
            "pid": kubelet.pid,
            "exe": kubelet.exe,
            "size_bytes": kubelet.size_bytes,
            "cached_bytes": kubelet.cached_bytes,
            "cached_percent": _round(_share(kubelet.cached_bytes, kubelet.size_bytes)),
            "method": kubelet.method,
            "note": kubelet.note,
            "system_reserved_memory": kubelet.system_reserved_memory,
            "eviction_hard_memory_available": kubelet.eviction_hard_memory,
        },
        "early_oom": [{"pid": process.pid, "comm": process.comm} for process in protection.early_oom],
    }


def _share(part: int | None, whole: int | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole * 100


# Text


def render_report(report: analysis.Report) -> None:
    """Print the report as sections of tables and wrapped text.

    Lines stay under 100 columns, except recommended commands, which are never wrapped.
    """
    _render_header(report)
    if report.breakdown is not None:
        _render_breakdown(report.breakdown)
    _render_holders(report)
    _render_signals(report)
    _render_verdict(report.verdict)
    _render_protection(report.protection)
    _render_settings(report)
    _render_unavailable(report.snapshot.sources)
    _render_recommendations(report.recommendations)


def _heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True)


def _paragraph(text: str, indent: str = "  ", hanging: str | None = None) -> None:
    """Print text wrapped at TEXT_WIDTH; continuation lines get the hanging indent."""
    click.echo(textwrap.fill(text, TEXT_WIDTH, initial_indent=indent, subsequent_indent=hanging or indent,
                             break_long_words=False, break_on_hyphens=False))


def _gib(size_bytes: int | None) -> str:
    return "-" if size_bytes is None else f"{size_bytes / GIB:.2f}"


def _pct(size_bytes: int | None, total: int | None) -> str:
    share = _share(size_bytes, total)
    return "-" if share is None else f"{share:.1f}"


def _render_header(report: analysis.Report) -> None:
    breakdown = report.breakdown
    summary = ""
    if breakdown is not None:
        summary = f"  (MemTotal {_gib(breakdown.total_bytes)} GiB, MemAvailable {_gib(breakdown.available_bytes)} GiB)"
    click.secho(f"prelock doctor: {report.verdict.state}{summary}", bold=True)


def _render_breakdown(breakdown: analysis.Breakdown) -> None:
    total = breakdown.total_bytes
    _heading("Where the memory is (rows add up to MemTotal)")
    rows = [[c.label, _gib(c.size_bytes), _pct(c.size_bytes, total), c.formula] for c in breakdown.categories]
    rows.append([UNACCOUNTED_LABEL, _gib(breakdown.unaccounted_bytes), _pct(breakdown.unaccounted_bytes, total),
                 "MemTotal - the rows above"])
    print_table(["category", "GiB", "% total", "meminfo"], rows, numeric={1, 2})

    _heading("Inside the rows above (not added again)")
    rows = [[c.label, _gib(c.size_bytes), _pct(c.size_bytes, total), c.formula] for c in breakdown.details]
    print_table(["value", "GiB", "% total", "meminfo"], rows, numeric={1, 2})


def _render_holders(report: analysis.Report) -> None:
    _heading("Likely holders of the unaccounted memory")
    if not report.holders:
        _paragraph("none found: no accelerator module is loaded and no slab tracks driver pages"
                   + ("" if report.snapshot.slabs is not None else " (slabinfo was not readable)"))
    for holder in report.holders:
        estimate = "no estimate" if holder.estimate_bytes is None else f"about {_gib(holder.estimate_bytes)} GiB"
        _paragraph(f"{holder.name} ({holder.kind}, {holder.description}): {estimate}; {holder.method}")
    if report.top_slabs:
        _heading("Largest slab caches")
        rows = [[slab.name, _gib(slab.size_bytes), f"{slab.active_objects:,}", slab.object_size_bytes]
                for slab in report.top_slabs]
        print_table(["cache", "GiB", "active objects", "object bytes"], rows, numeric={1, 2, 3})


def _render_signals(report: analysis.Report) -> None:
    rates = report.rates
    title = f"Thrash signals over {rates.interval_s:.1f} s" if rates else "Thrash signals"
    _heading(title)
    rows = []
    if rates is not None:
        for label, value in (("file refaults/s", rates.refaults_file_per_s),
                             ("major faults/s", rates.major_faults_per_s),
                             ("pages scanned/s", rates.pages_scanned_per_s),
                             ("pages stolen/s", rates.pages_stolen_per_s)):
            rows.append([label, "-" if value is None else f"{value:,.0f}", ""])
    for resource, pressure in report.snapshot.pressure.items():
        for kind in ("some", "full"):
            line = getattr(pressure, kind)
            if line is None:
                continue
            measured = rates.psi_percent.get(f"{resource}_{kind}") if rates else None
            value = "-" if measured is None else f"{measured:.1f} %"
            rows.append([f"PSI {resource} {kind}", value,
                         f"avg10 {line.avg10:.1f} %, avg60 {line.avg60:.1f} %, avg300 {line.avg300:.1f} %"])
    if rows:
        print_table(["signal", "over interval", "kernel averages"], rows, numeric={1})
    if report.rates_note:
        _paragraph(f"rates {report.rates_note}")


def _render_verdict(verdict: analysis.Verdict) -> None:
    _heading(f"Verdict: {verdict.state}")
    for rule in verdict.rules:
        mark = "FIRED" if rule.fired else "no   "
        _paragraph(f"{mark} {rule.verdict} if {rule.condition}", hanging="        ")
        _paragraph(f"observed: {rule.observed}", indent="        ")
    if verdict.note:
        _paragraph(verdict.note)


def _render_protection(protection: analysis.Protection) -> None:
    _heading("Protection")
    daemon = ", ".join(str(pid) for pid in protection.daemon_pids) or "not running"
    lines = [f"prelock daemon: {daemon}"]
    for item in protection.status_files:
        if item.error:
            lines.append(f"status file {item.path}: {item.error}")
        else:
            state = "" if item.running else " (that daemon is not running: it stopped or was killed)"
            lines.append(f"status file {item.path}: pid {item.pid}, locked {_gib(item.locked_bytes)} GiB, "
                         f"updated {item.age_s:.0f} s ago{state}")
    if protection.status_note:
        lines.append(f"status file: {protection.status_note}")
    lines.append(f"mlocked (meminfo Mlocked): {_gib(protection.mlocked_bytes)} GiB")
    lines.append(_kubelet_line(protection.kubelet))
    early = ", ".join(f"{process.comm} ({process.pid})" for process in protection.early_oom)
    lines.append(f"early-OOM daemon: {early or 'none running'}")
    for line in lines:
        _paragraph(line)


def _kubelet_line(kubelet: analysis.KubeletState) -> str:
    if kubelet.pid is None:
        return f"kubelet: {kubelet.note}"
    text = f"kubelet (pid {kubelet.pid})"
    if kubelet.cached_bytes is not None and kubelet.size_bytes:
        text += (f": {kubelet.exe} has {_share(kubelet.cached_bytes, kubelet.size_bytes):.0f} % of "
                 f"{kubelet.size_bytes / (1 << 20):.1f} MiB in the page cache ({kubelet.method})")
    elif kubelet.method:
        text += f": {kubelet.exe} residency {kubelet.method}"
    text += (f"; system-reserved memory {kubelet.system_reserved_memory or 'not set'}, "
             f"eviction-hard memory.available {kubelet.eviction_hard_memory or 'not set'}")
    if kubelet.note:
        text += f"; {kubelet.note}"
    return text


def _render_settings(report: analysis.Report) -> None:
    snapshot = report.snapshot
    _heading("Swap, MGLRU, sysctls and memory cgroups")
    meminfo = snapshot.meminfo or {}
    if meminfo.get("SwapTotal"):
        used = meminfo["SwapTotal"] - meminfo.get("SwapFree", 0)
        areas = ", ".join(area.path for area in snapshot.swaps or ())
        _paragraph(f"swap: {_gib(meminfo['SwapTotal'])} GiB, {_gib(used)} GiB used ({areas or 'areas unknown'})")
    else:
        _paragraph("swap: none" if "SwapTotal" in meminfo else "swap: unknown")
    lru_gen = snapshot.lru_gen
    if lru_gen is None:
        _paragraph("MGLRU: not available")
    else:
        _paragraph(f"MGLRU: enabled={lru_gen.enabled_mask:#06x} ({'on' if lru_gen.enabled else 'off'}), "
                   f"min_ttl_ms={lru_gen.min_ttl_ms}")
    if snapshot.sysctls:
        _paragraph("vm: " + ", ".join(f"{name}={value}" for name, value in snapshot.sysctls.items()))
    _render_cgroups(report.cgroups, report.breakdown)


def _render_cgroups(cgroups: analysis.CgroupState, breakdown: analysis.Breakdown | None) -> None:
    if cgroups.version is not None:
        _paragraph(f"memory cgroups: v{cgroups.version} at {cgroups.mount}")
    if cgroups.groups:
        total = breakdown.total_bytes if breakdown else None
        rows = [[group.name, _gib(group.usage_bytes), _pct(group.usage_bytes, total),
                 _gib(group.limit_bytes) if group.limit_bytes is not None else "none",
                 _gib(group.anon_bytes), _gib(group.file_bytes), _gib(group.kernel_bytes)]
                for group in cgroups.groups]
        print_table(["cgroup", "usage GiB", "% total", "limit GiB", "anon", "file", "kernel"], rows,
                    numeric={1, 2, 3, 4, 5, 6})
    if cgroups.note:
        _paragraph(f"memory cgroups: {cgroups.note}")


def _render_unavailable(sources: list[analysis.Source]) -> None:
    missing = [source for source in sources if not source.available]
    if not missing:
        return
    _heading("Unavailable inputs")
    for source in missing:
        _paragraph(f"{source.name} ({source.path}): {source.error}")


def _render_recommendations(recommendations: tuple[analysis.Recommendation, ...]) -> None:
    _heading("Recommendations")
    if not recommendations:
        _paragraph("none")
    for number, item in enumerate(recommendations, start=1):
        click.echo()
        click.secho(f"{number}. {item.title}", bold=True)
        _paragraph(item.reason, indent="   ")
        # Commands are printed unwrapped so that they can be copied as they are.
        for command in item.commands:
            click.echo(f"     {command}")
        if item.note:
            _paragraph(item.note, indent="   ")
