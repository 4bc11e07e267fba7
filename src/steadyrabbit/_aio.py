"""Small asyncio helpers shared by the worker and its consumers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from ._errors import SteadyRabbitError


async def finish(futures: Iterable[asyncio.Future[Any]], patience: float) -> None:
    """Give ``futures`` ``patience`` seconds to end by themselves, then cancel the rest; collect
    every outcome. steadyrabbit's own errors are expected at this point (a connection closed
    on the way out) and dropped; anything else is raised."""
    futures = list(futures)
    pending = [f for f in futures if not f.done()]
    if pending:
        _, late = await asyncio.wait(pending, timeout=patience)
        for future in late:
            future.cancel()
        if late:
            await asyncio.wait(late)
    for future in futures:
        if not future.cancelled():
            with contextlib.suppress(SteadyRabbitError):
                future.result()
