"""The prelock command line: a click group whose subcommands are imported on use."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from prelock import __version__
from prelock.errors import ExitCode, PrelockError

# Each subcommand lives in its own module and is imported only when it runs (or when
# --help lists it), so `prelock plan` never pays for matplotlib or prometheus-client.
COMMANDS = {
    "bench": "prelock.cli.bench:bench",
    "cache": "prelock.cli.cache:cache",
    "check-config": "prelock.cli.check_config:check_config",
    "doctor": "prelock.cli.doctor:doctor",
    "plan": "prelock.cli.plan:plan",
    "run": "prelock.cli.run:run",
    "status": "prelock.cli.status:status",
}

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  runtime failure
  2  usage error or invalid configuration
  3  missing privilege (root, CAP_IPC_LOCK, RLIMIT_MEMLOCK)
  130  interrupted by Ctrl-C (bench, after its cleanup)
"""


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PrelockError as exc:
            click.echo(f"prelock: {exc}", err=True)
            sys.exit(int(exc.exit_code))


@click.group(cls=LazyGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prelock")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Log level for this run; overrides log_level in the config file.")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Keep the code pages of running programs locked in memory."""
    ctx.ensure_object(dict)
    ctx.obj["log_level"] = log_level
    setup_logging(log_level or "info")


def setup_logging(level: str) -> None:
    """Log to stderr without timestamps: journald and kubectl logs add their own."""
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s",
                        level=getattr(logging, level.upper()), force=True)


def usage_exit(message: str) -> None:
    click.echo(f"prelock: {message}", err=True)
    sys.exit(int(ExitCode.USAGE))
