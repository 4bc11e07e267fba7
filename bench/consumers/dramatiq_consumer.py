"""dramatiq: RabbitmqBroker, one actor, a Worker with ``concurrency`` worker threads.

The queue was declared by the parent through dramatiq's own ``broker.declare_queue`` and filled
with dramatiq-encoded messages (``dramatiq.Message(...).encode()``, the payload as the single
argument), so dramatiq decodes its JSON envelope for every message in every workload. The
consumer prefetch is set with dramatiq's documented ``dramatiq_queue_prefetch`` environment
variable (default: 2 x threads). Acks are counted by a middleware's ``after_ack`` hook (the
worker thread has handed the ack to the consumer connection). The async workload uses an
``async def`` actor with the AsyncIO middleware: dramatiq runs it on its event-loop thread while
the worker thread waits for it, so ``concurrency`` threads still mean ``concurrency`` handlers.
Default middleware stays on (as in a default install); retries are off (``max_retries=0``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from _probe import Probe

ACTOR_NAME = "steadyrabbit_bench_handler"
_SETTLE_S = 0.3
_WORKER_TIMEOUT_MS = 100


def run(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    # dramatiq reads this exact (lower-case) name when dramatiq.worker is imported.
    os.environ["dramatiq_queue_prefetch"] = str(int(spec["prefetch"]))  # noqa: SIM112
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.middleware import AsyncIO, Middleware

    done = threading.Event()
    kind = spec["handler"]
    delay = float(spec.get("sleep", 0.0))

    class CountAcks(Middleware):  # type: ignore[misc]
        def after_ack(self, broker: Any, message: Any) -> None:
            if probe.acked():
                done.set()

    broker = RabbitmqBroker(url=spec["url"])
    broker.add_middleware(CountAcks())
    if kind == "async_sleep":
        broker.add_middleware(AsyncIO())
    dramatiq.set_broker(broker)
    options: dict[str, Any] = {"queue_name": spec["queue"], "actor_name": ACTOR_NAME}
    options["max_retries"] = 0

    if kind == "async_sleep":

        async def handle(payload: Any) -> None:
            probe.start()
            await asyncio.sleep(delay)
            probe.handled()

    elif kind == "sync_sleep":

        def handle(payload: Any) -> None:
            probe.start()
            time.sleep(delay)
            probe.handled()

    elif kind == "json":

        def handle(payload: Any) -> None:
            probe.start()
            payload.get("id")  # decoded with dramatiq's envelope
            probe.handled()

    else:

        def handle(payload: Any) -> None:
            probe.start()
            probe.handled()

    dramatiq.actor(handle, **options)
    # worker_timeout (ms): how long idle consumer and worker threads block between checks;
    # 100 instead of 1000 only makes the (untimed) shutdown quicker.
    worker = dramatiq.Worker(
        broker, worker_threads=int(spec["concurrency"]), worker_timeout=_WORKER_TIMEOUT_MS
    )
    worker.start()
    try:
        if not done.wait(float(spec["timeout"])):
            raise TimeoutError("dramatiq did not ack every message in time")
        # The acks were handed to the consumer's connection; let it send them before closing.
        time.sleep(_SETTLE_S)
    finally:
        worker.stop()
        broker.close()
    return {"threads": int(spec["concurrency"])}
