"""How the command line logs: secrets masked in every record, plain or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .._url import MaskingFilter, MaskingFormatter, mask_url

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(MaskingFormatter):
    """One JSON object per record, for log shippers; secrets are masked before this runs.

    ``time`` is ISO 8601 in UTC. A record about a message (a failed attempt, a retry, a dead
    letter) has a short ``message`` (the event: "handler failed") and its facts as fields
    (queue, message_id, attempt, outcome, error_type, duration, ...), not prose.
    """

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        event = getattr(record, "event", None)
        if isinstance(event, str):
            entry["message"] = event
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                for key, value in fields.items():
                    if value is not None and key not in entry:
                        entry[key] = mask_url(value) if isinstance(value, str) else value
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            MaskingFormatter("%(asctime)s %(process)d %(levelname)-7s %(name)s: %(message)s")
        )
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pika logs every socket error with a traceback; the supervisor reports each one in a line.
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "debug" else logging.CRITICAL)
    # httpx logs every request at INFO: one line per message is noise in a worker's log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)

