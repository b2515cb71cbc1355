"""`prelock status`: what the running daemon holds, checked against the kernel's page flags."""

from __future__ import annotations

import json
import os

import click

from prelock import pagemap, procfs
from prelock.cli.render import print_table
from prelock.config import load_config
from prelock.daemon import STATUS_FILE
from prelock.errors import AccessDenied, PrelockError, ProcessGone
from prelock.native import PAGE_SIZE
from prelock.units import format_size


@click.command("status")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file whose state_dir holds the daemon's status file.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Count PG_mlocked pages of each held file from pagemap and /proc/kpageflags (root).")
def status(config_path: str | None, as_json: bool, verify: bool) -> None:
    """Show the files the running daemon holds locked."""
    config = load_config(config_path)
    record = read_status(os.path.join(config.state_dir, STATUS_FILE))
    record["running"] = _is_running(record["pid"])
    if verify and record["running"]:
        _verify(record)

    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    rows = [[f["tier"], f["path"], format_size(f["locked_bytes"]),
             "-" if f.get("mlocked_bytes") is None else format_size(f["mlocked_bytes"])]
            for f in record["files"]]
    print_table(["Tier", "File", "Locked", "PG_mlocked"], rows, numeric={2, 3})
    state = "running" if record["running"] else "not running (stale status file)"
    click.echo(f"daemon pid={record['pid']} {state} cycles={record['cycles']} files={len(record['files'])} "
               f"locked={format_size(record['locked_bytes'])}")


def read_status(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PrelockError(f"no status file at {path}: is `prelock run` running with this config?") from None
    except (OSError, ValueError) as exc:
        raise PrelockError(f"cannot read the status file {path}: {exc}") from None


def _is_running(pid: int) -> bool:
    """Whether pid is still a prelock process, and not a later process that reused the pid."""
    try:
        return any("prelock" in argument for argument in procfs.read_cmdline(pid))
    except (ProcessGone, AccessDenied, OSError):
        return False


def _verify(record: dict) -> None:
    """Add mlocked_bytes to each file: PG_mlocked pages mapped in the daemon's mapping."""
    for held in record["files"]:
        try:
            raw = pagemap.read_pagemap(record["pid"], held["address"], held["address"] + held["length_bytes"])
            flags = pagemap.read_kpageflags(pagemap.pfns(raw))
        except (ProcessGone, AccessDenied, OSError):
            held["mlocked_bytes"] = None
            continue
        if not flags and any(pagemap.present_file_pages(raw)):
            # PFNs read as zero without CAP_SYS_ADMIN: nothing can be verified.
            held["mlocked_bytes"] = None
            continue
        held["mlocked_bytes"] = sum(pagemap.is_mlocked(value) for value in flags.values()) * PAGE_SIZE
