"""Options that several commands share, declared once."""

from __future__ import annotations

import os

import click

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    help="Config file (default: /etc/prelock/prelock.yaml, else built-in defaults).")


def _check_procfs_root(_ctx: click.Context, _param: click.Parameter, root: str) -> str:
    # /proc/meminfo and /proc/self exist in every procfs; a wrong path fails here, with a
    # message, instead of deep inside the first scan.
    if not os.path.isfile(os.path.join(root, "meminfo")) or not os.path.isdir(os.path.join(root, "self")):
        raise click.BadParameter(f"{root!r} is not a procfs mount (no meminfo or self in it)")
    return os.path.abspath(root)


procfs_root_option = click.option(
    "--procfs-root", "proc_root", metavar="DIR", default="/proc", show_default=True, callback=_check_procfs_root,
    help="Where procfs is mounted (a host /proc bind-mounted into a container, say).")
