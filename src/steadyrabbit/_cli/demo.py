"""``steadyrabbit demo``: the quick start."""

from __future__ import annotations

import sys

import click

from .._config import Config
from .._demo import demo_command
from .options import BROKER, configured

__all__ = ["demo_cmd"]


@click.command("demo")
@click.option(
    "--messages",
    type=int,
    default=60,
    show_default=True,
    help="Messages in the backlog, 1 to 1000000 (from 5 on, two of them poison).",
)
@click.option(
    "--concurrency",
    type=int,
    default=2,
    show_default=True,
    help="Requests the relay keeps in flight, 1 to 1000.",
)
@click.option(
    "--live/--no-live",
    default=True,
    show_default=True,
    help="Show the worker's live view (on a terminal; piped: a status line every 5 s).",
)
@click.option(
    "--keep", is_flag=True, help="Leave the demo's queues on the broker (see `dlq list`)."
)
@click.option(
    "--seed", type=int, default=42, show_default=True, help="Seed of the service's answers."
)
@configured(BROKER)
def demo_cmd(
    messages: int, concurrency: int, live: bool, keep: bool, seed: int, config: Config
) -> None:
    """Relay a backlog to a slow, flaky local web service, reset the connection part-way, and
    account for every message.

    Against the broker of --url (the local one by default): publishes a backlog to the
    steadyrabbit-demo exchange, relays it with retries and a dead-letter queue while showing
    the live view, cuts the worker's connection a third of the way through, and ends with a
    summary: delivered, retried, dead-lettered, reconnects survived, lost. Exit status 0 when
    every message is accounted for. Its own queues (steadyrabbit-demo.*) are deleted before
    and after the run.
    """
    sys.exit(
        demo_command(
            config.settings(),
            messages=messages,
            concurrency=concurrency,
            live=live,
            keep=keep,
            seed=seed,
        )
    )

