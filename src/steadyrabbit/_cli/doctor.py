"""``steadyrabbit doctor``: check the broker, the queues and these settings."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from .._config import Config
from .._ops.doctor.gather import diagnose
from .._ops.doctor.render import can_encode, format_report
from .exits import EXIT_FAILURE
from .options import BROKER, DOCTOR, DOCTOR_WINDOW, RELAY, WORKER, configured

__all__ = ["doctor_command"]


@click.command("doctor")
@click.argument("queues", nargs=-1, metavar="[QUEUE]...")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@configured(BROKER, WORKER, DOCTOR_WINDOW, RELAY, DOCTOR)
def doctor_command(queues: tuple[str, ...], as_json: bool, config: Config) -> None:
    """Check the broker, each QUEUE and these worker settings before running a worker.

    Connects as a worker with the same options would and reports, as a checklist (or JSON):
    the server, the negotiated heartbeat, each queue (type, arguments, counts, consumers and
    their prefetch, dead-letter and retry queues), whether a prefetched message would wait
    past consumer_timeout, alarms and blocked connections, how runs longer than
    consumer_timeout are protected, and the idempotency store (reachable, its records and the
    oldest one's age), each with a one-line fix. Works without the management plugin, listing
    what it could not check. Exit status 1 when a finding is critical. Takes every option of
    `run` and `relay`, so that a worker's command line (or config file) can be checked as it
    is.
    """
    report = asyncio.run(
        diagnose(
            config.settings(),
            queues,
            prefetch=config.prefetch,
            concurrency=config.concurrency,
            handler_seconds=config.handler_seconds,
            management_url=config.management_url,
        )
    )
    unicode = can_encode(sys.stdout)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=not unicode))
    else:
        click.echo(format_report(report, unicode=unicode))
    if report.critical:
        sys.exit(EXIT_FAILURE)

