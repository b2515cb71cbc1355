"""`prelock run`: the locking daemon."""

from __future__ import annotations

import logging

import click

from prelock import daemon as daemon_module
from prelock import state
from prelock.cli import setup_logging
from prelock.cli.options import config_option, procfs_root_option
from prelock.config import load_config

log = logging.getLogger("prelock.daemon")


@click.command("run")
@config_option
@click.option("--cycles", type=click.IntRange(min=1), default=None,
              help="Stop after this many cycles (default: run until SIGTERM).")
@procfs_root_option
@click.option("--restore/--no-restore", default=True, show_default=True,
              help="Lock the unchanged files of the last snapshot in state_dir before the first scan.")
@click.pass_context
def run(ctx: click.Context, config_path: str | None, cycles: int | None, proc_root: str, restore: bool) -> None:
    """Lock the code pages of the configured processes and follow them.

    SIGHUP reloads the config (an invalid one is reported and the running one kept);
    SIGTERM or SIGINT releases everything and exits 0.
    """
    config = load_config(config_path)
    setup_logging(ctx.obj.get("log_level") or config.log_level)

    current = daemon_module.check_privilege()
    # Held until the process exits: the kernel drops a flock with its last descriptor.
    state.acquire(config.state_dir)
    daemon_module.lock_own_pages(current)
    daemon = daemon_module.Daemon(config, config_path, proc_root, log_level_override=ctx.obj.get("log_level"))
    if config.metrics.listen:
        from prelock.metrics import Metrics

        daemon.metrics = Metrics(config.metrics.listen)
    log.info("starting: config=%s mode=%s budget=%s interval=%.0fs", config.source, config.lock.mode,
             config.lock.budget, config.scan.interval_s)
    daemon_module.run(daemon, max_cycles=cycles, restore=restore)
