"""How the command line logs: secrets masked in every record, plain or JSON lines on stderr."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from .._url import MaskingFilter, MaskingFormatter

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(MaskingFormatter):
    """One JSON object per record, for log shippers; secrets are masked before this runs."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


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

