"""`prelock status`: what the running daemon holds, checked against the kernel's page flags."""

from __future__ import annotations

import json
import os
import time

import click

from prelock import pagemap, procfs, state
from prelock.cli.options import config_option
from prelock.cache_render import path_fields, printable
from prelock.cli.render import print_table
from prelock.config import load_config
from prelock.daemon import STATUS_FILE
from prelock.errors import AccessDenied, ExitCode, PrelockError, ProcessGone
from prelock.native import PAGE_SIZE
from prelock.units import format_size


@click.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Count PG_mlocked pages of each held file from pagemap and /proc/kpageflags (root).")
def status(config_path: str | None, as_json: bool, verify: bool) -> None:
    """Show the files the running daemon holds locked.

    Exits 1 when no daemon runs with this config's state_dir, so monitoring can alert.
    """
    config = load_config(config_path)
    path = os.path.join(config.state_dir, STATUS_FILE)
    record = read_status(path)
    stopped_cleanly = record.get("running", True) is False
    record["running"] = not stopped_cleanly and _is_running(record["pid"])
    if verify and record["running"]:
        _verify(record)

    age_s = time.time() - record["updated_at"] if isinstance(record.get("updated_at"), (int, float)) else 0.0
    # A cycle rewrites the file every scan.interval; three missed rewrites mean a stuck daemon.
    stale = record["running"] and age_s > 3 * config.scan.interval_s + 60
    if stale:
        click.echo(f"prelock: the status file is {age_s:.0f} s old with scan.interval "
                   f"{config.scan.interval_s:.0f} s: the daemon may be stuck, or cannot write to state_dir "
                   "(see its log)", err=True)

    if as_json:
        record["files"] = [{**held, **path_fields(held["path"])} for held in record["files"]]
        click.echo(json.dumps(record, indent=2))
    else:
        _render(record, stopped_cleanly)
    if not record["running"] or stale:
        raise SystemExit(int(ExitCode.RUNTIME_FAILURE))


def _render(record: dict, stopped_cleanly: bool) -> None:
    if stopped_cleanly:
        click.echo(f"prelock: no daemon runs with this state_dir: pid {record['pid']} has stopped "
                   "and holds nothing", err=True)
        return
    if not record["running"]:
        click.echo(f"prelock: no daemon runs with this state_dir: pid {record['pid']} is no longer a "
                   "prelock daemon (it was killed), so it holds nothing", err=True)
        return
    rows = [[f["tier"], printable(f["path"]), format_size(f["locked_bytes"]),
             "-" if f.get("mlocked_bytes") is None else format_size(f["mlocked_bytes"])]
            for f in record["files"]]
    print_table(["Tier", "File", "Locked", "PG_mlocked"], rows, numeric={2, 3})
    click.echo(f"daemon pid={record['pid']} running cycles={record['cycles']} files={len(record['files'])} "
               f"locked={format_size(record['locked_bytes'])}")


_MAX_LENGTH_BYTES = 1 << 40
_FILE_FIELDS = {"path": str, "tier": str, "locked_bytes": int, "address": int, "length_bytes": int}


def read_status(path: str) -> dict:
    """Read and check the daemon's status file; raises PrelockError naming the problem."""
    try:
        record = state.read_json(path)
    except FileNotFoundError:
        raise PrelockError(f"no status file at {path}: is `prelock run` running with this config?") from None
    except OSError as exc:
        raise PrelockError(f"cannot read the status file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise PrelockError(f"the status file {path} is not valid JSON ({exc}): restart the daemon, "
                           "which rewrites it every cycle") from None

    problem = _status_problem(record)
    if problem is not None:
        raise PrelockError(f"the status file {path} is malformed: {problem}; restart the daemon, "
                           "which rewrites it every cycle")
    return record


def _status_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    for key in ("pid", "cycles", "locked_bytes"):
        if type(record.get(key)) is not int:
            return f"{key!r} is missing or not an integer"
    if not isinstance(record.get("files"), list):
        return "'files' is missing or not a list"
    for index, held in enumerate(record["files"]):
        if not isinstance(held, dict):
            return f"files[{index}] is not an object"
        for key, kind in _FILE_FIELDS.items():
            if type(held.get(key)) is not kind:
                return f"files[{index}].{key} is missing or not {'a string' if kind is str else 'an integer'}"
        # The daemon maps at most one file of lock.max_file_size, and verify reads its pagemap.
        if not 0 < held["length_bytes"] <= _MAX_LENGTH_BYTES:
            return f"files[{index}].length_bytes {held['length_bytes']} is out of range"
    return None


def _is_running(pid: int) -> bool:
    """Check that pid is still a prelock process, not a later process that reused the pid."""
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
