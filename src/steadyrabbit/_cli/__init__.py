"""The command line: a thin layer over functions usable from code (:func:`steadyrabbit.run`,
:func:`relay_app`, the dead-letter tools, doctor, top, the demo).

The only package that imports click. :func:`main` is the ``steadyrabbit`` console script and
``python -m steadyrabbit``; each command group lives in a module of its own and is added to
:data:`cli` here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from .._errors import ConfigurationError, SteadyRabbitError
from .._url import mask_url
from .demo import demo_cmd
from .dlq import dlq_group
from .doctor import doctor_command
from .exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .run import CommandLine, relay_command, run_command
from .top import top_command

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="steadyrabbit")
def cli() -> None:
    """RabbitMQ consumers with slow handlers, made safe."""


cli.add_command(run_command)
cli.add_command(relay_command)
cli.add_command(dlq_group)
cli.add_command(doctor_command)
cli.add_command(demo_cmd)
cli.add_command(top_command)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: every error ends in one line on stderr and a non-zero exit status."""
    given = CommandLine(tuple(argv if argv is not None else sys.argv[1:]))
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="steadyrabbit",
                 standalone_mode=False, obj=given)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", EXIT_USAGE)
    except click.ClickException as exc:
        _fail(exc.format_message(), EXIT_USAGE)
    except click.Abort:
        _fail("aborted", EXIT_FAILURE)
    except ConfigurationError as exc:
        _fail(str(exc), EXIT_USAGE)
    except SteadyRabbitError as exc:
        _fail(str(exc), EXIT_FAILURE)
    sys.exit(EXIT_OK)


def _fail(message: str, status: int) -> NoReturn:
    # Several problems (a configuration with two bad values) are one line each, each marked.
    for line in mask_url(message).splitlines() or [""]:
        click.echo(f"steadyrabbit: error: {line}", err=True)
    sys.exit(status)
