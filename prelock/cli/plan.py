"""`prelock plan`: what the daemon would lock on this system now, and what it would cost."""

from __future__ import annotations

import dataclasses
import json
import os

import click

from prelock.cli.options import config_option, procfs_root_option
from prelock.cache_render import path_fields, printable
from prelock.cli.render import print_table
from prelock.config import load_config
from prelock.errors import ExitCode
from prelock.native import PAGE_SIZE
from prelock.plan import TIERS, Plan
from prelock.scan import scan_and_plan
from prelock.units import format_size


@click.command("plan")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--mode", type=click.Choice(["working-set", "mapped", "whole-file"]), default=None,
              help="Override lock.mode for this plan.")
@procfs_root_option
@click.option("--limit", "row_limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="Rows of files to print in the table (0 for all); totals always cover every file.")
def plan(config_path: str | None, as_json: bool, mode: str | None, proc_root: str, row_limit: int) -> None:
    """Show what `prelock run` would lock, without locking anything."""
    config = load_config(config_path)
    if mode is not None:
        config = dataclasses.replace(config, lock=dataclasses.replace(config.lock, mode=mode))
    if os.geteuid() != 0:
        click.echo("prelock: not root: processes of other users are skipped and the plan is partial",
                   err=True)

    result, scan = scan_and_plan(config, proc_root)
    if scan.processes_denied:
        click.echo(f"prelock: processes not readable (access denied), missing from the plan: "
                   f"{scan.processes_denied}; run as root with CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH "
                   "(a sandbox or Yama ptrace policy can deny some processes even then)", err=True)
    if as_json:
        click.echo(json.dumps(plan_record(result, scan.targets_read), indent=2))
    else:
        render_plan(result, scan.targets_read, row_limit)
    raise SystemExit(int(ExitCode.OK))


def plan_record(result: Plan, processes: int) -> dict:
    """Return the plan as a JSON-ready dict; sizes in bytes, pages of PAGE_SIZE bytes."""
    return {
        "mode": result.mode,
        "page_size": PAGE_SIZE,
        "budget_bytes": result.budget_bytes,
        "targets_read": processes,
        "targets": result.targets,
        "totals": totals(result),
        "files": [
            {
                **path_fields(f.path),
                "tier": f.tier,
                "dev": f.key[0],
                "inode": f.key[1],
                "size_bytes": f.size_bytes,
                "pages_planned": f.pages_planned,
                "pages_mapped": f.pages_mapped,
                "pages_file": -(-f.size_bytes // PAGE_SIZE),
                "planned_bytes": f.planned_bytes,
                "processes": [{"pid": pid, "comm": comm} for pid, comm in f.owners],
            }
            for f in result.files
        ],
        "skipped": [
            {**path_fields(s.path), "reason": s.reason, "tier": s.tier, "size_bytes": s.size_bytes}
            for s in result.skipped
        ],
    }


def totals(result: Plan) -> dict:
    by_tier = {tier: {"files": 0, "planned_bytes": 0} for tier in TIERS}
    for planned in result.files:
        by_tier[planned.tier]["files"] += 1
        by_tier[planned.tier]["planned_bytes"] += planned.planned_bytes
    planned_bytes = sum(t["planned_bytes"] for t in by_tier.values())
    return {"planned_bytes": planned_bytes, "files": len(result.files), "by_tier": by_tier,
            "skipped_files": len(result.skipped)}


def render_plan(result: Plan, processes: int, row_limit: int) -> None:
    rows = []
    shown = result.files if row_limit <= 0 else result.files[:row_limit]
    for f in shown:
        owners = ",".join(sorted({comm for _, comm in f.owners}))
        rows.append([f.tier, printable(f.path), _truncate(printable(owners), 24), f.pages_planned, f.pages_mapped,
                     -(-f.size_bytes // PAGE_SIZE), format_size(f.planned_bytes)])
    print_table(["Tier", "File", "Processes", "Planned", "Mapped", "FilePages", "Bytes"], rows,
                numeric={3, 4, 5, 6})
    if len(shown) < len(result.files):
        click.echo(f"... {len(result.files) - len(shown)} more files (use --limit 0 or --json)")

    summary = totals(result)
    click.echo(f"mode={result.mode} targets_read={processes} "
               f"targets critical={result.targets.get('critical', 0)} others={result.targets.get('others', 0)}")
    for tier in TIERS:
        tier_totals = summary["by_tier"][tier]
        click.echo(f"{tier}: files={tier_totals['files']} size={format_size(tier_totals['planned_bytes'])}")
    click.echo(f"total: files={summary['files']} size={format_size(summary['planned_bytes'])} "
               f"budget={format_size(result.budget_bytes)}")
    # Populating a page maps and locks its whole folio, or its 64 KiB fault-around window.
    click.echo("note: run locks whole folios, so it can lock more than planned; "
               "`prelock status` shows what is locked")
    _render_skipped(result)


def _render_skipped(result: Plan) -> None:
    reasons: dict[str, int] = {}
    for skipped in result.skipped:
        reasons[skipped.reason] = reasons.get(skipped.reason, 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        click.echo(f"skipped: {count} files: {reason}")
    for skipped in result.skipped:
        if skipped.reason in ("over budget", "min_available floor", "larger than lock.max_file_size"):
            click.echo(f"skipped {printable(skipped.path)} tier={skipped.tier} size={format_size(skipped.size_bytes)}: "
                       f"{skipped.reason}")


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
