"""Raw pika: BlockingConnection, basic_qos(prefetch), one basic_ack per message (or, with
``spec["batched_acks"]``, one ``multiple=True`` ack every prefetch / 2 deliveries).

Handlers are plain callbacks on the connection's thread. pika has no async handlers, so the
async workload (W2) runs sequentially here (``spec["mode"] == "sequential"``: one blocking
``time.sleep`` per message). The blocking workload (W3) uses pika's documented thread pattern:
the handler runs in a pool of ``concurrency`` threads and the ack is handed back to the
connection's thread with ``connection.add_callback_threadsafe``; at pika's defaults
(``spec["defaults"]``, with ``mode`` sequential) it runs in the callback like W2's.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
from _probe import Probe


def run(spec: dict[str, Any], probe: Probe) -> dict[str, Any]:
    params = pika.URLParameters(spec["url"])
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    if not spec.get("defaults"):  # pika's default: no basic.qos, an unlimited prefetch
        channel.basic_qos(prefetch_count=int(spec["prefetch"]))
    kind = spec["handler"]
    delay = float(spec.get("sleep", 0.0))
    extra: dict[str, Any] = {}

    def ack(tag: int) -> None:
        channel.basic_ack(tag)
        if probe.acked():
            channel.stop_consuming()

    if kind == "sync_sleep" and spec.get("mode") != "sequential":
        pool = ThreadPoolExecutor(int(spec["concurrency"]))

        def work(tag: int) -> None:
            time.sleep(delay)
            probe.handled()
            connection.add_callback_threadsafe(functools.partial(ack, tag))

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            probe.start()
            pool.submit(work, method.delivery_tag)

        extra["threads"] = int(spec["concurrency"])
    elif kind in ("async_sleep", "sync_sleep"):  # sequential
        # No concurrency without threads or an event loop: one message at a time.

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            probe.start()
            time.sleep(delay)
            probe.handled()
            ack(method.delivery_tag)

        extra["mode"] = "sequential"
    elif kind == "json":

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            probe.start()
            json.loads(body).get("id")
            probe.handled()
            ack(method.delivery_tag)

    elif spec.get("batched_acks"):
        # Every 50th delivery (half the prefetch) acks all before it at once; the last too.
        batch = max(1, int(spec["prefetch"]) // 2)

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            probe.start()
            last = probe.handled()
            if last or method.delivery_tag % batch == 0:
                channel.basic_ack(method.delivery_tag, multiple=True)
                if last:
                    probe.finish()
                    channel.stop_consuming()

        extra["acks"] = f"multiple=True every {batch}"
    else:

        def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
            probe.start()
            probe.handled()
            ack(method.delivery_tag)

    channel.basic_consume(spec["queue"], on_message)
    channel.start_consuming()
    connection.close()
    return extra
