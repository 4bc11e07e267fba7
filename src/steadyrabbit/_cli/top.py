"""``steadyrabbit top``: watch a running worker."""

from __future__ import annotations

import click

from .._config import Config
from .._ops.top import run_top
from .options import TOP, configured

__all__ = ["top_command"]


@click.command("top")
@click.argument("url", metavar="METRICS_URL")
@click.option("--once", is_flag=True, help="Print one frame (averages since start) and exit.")
@configured(TOP)
def top_command(url: str, once: bool, config: Config) -> None:
    """Watch a running worker: throughput, handlers in flight and their age against
    consumer_timeout, retries, dead letters and reconnects.

    METRICS_URL is the worker's metrics endpoint (--metrics-port): http://HOST:PORT, HOST:PORT
    or just PORT on this machine. Ctrl-C ends it.
    """
    run_top(url, interval=config.interval, once=once)

