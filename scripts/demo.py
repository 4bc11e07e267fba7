"""The quick-start demo: the seed-1 job done by `steadyrabbit relay`, against the local broker.

It publishes a backlog of JSON "contracts" to a topic exchange, starts a local web service that
is slow (about a second per call), fails now and then and always fails on contract 13, relays
the queue to it with the real CLI (retrying failures twice), then stops the relay with SIGTERM
and checks that every message is accounted for.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pika

URL = os.environ.get("STEADYRABBIT_URL", "amqp://guest:guest@localhost:5672/%2F").split(",")[0]
QUEUE = "steadyrabbit-demo.contracts"
EXCHANGE = "steadyrabbit-demo"
ROUTING_KEY = "purchasing.system.contract"
BACKLOG = 24


class Service(http.server.BaseHTTPRequestHandler):
    received: list[int] = []
    failed: list[int] = []
    lock = threading.Lock()
    rng = random.Random(42)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            fail = body["contract"] == 13 or self.rng.random() < 0.15
            if fail:
                self.failed.append(body["contract"])
        time.sleep(0.8 if not fail else 0.1)
        status = 500 if fail else 200
        if not fail:
            with self.lock:
                self.received.append(body["contract"])
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"accepted" if not fail else b"reporting backend unavailable")

    def log_message(self, *args: object) -> None:
        pass


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Service)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{server.server_address[1]}/contracts"

    with pika.BlockingConnection(pika.URLParameters(URL)) as connection:
        channel = connection.channel()
        channel.queue_delete(QUEUE)
        channel.queue_delete(f"{QUEUE}.dlq")
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.queue_declare(QUEUE, durable=True)
        channel.queue_bind(QUEUE, EXCHANGE, ROUTING_KEY)
        channel.confirm_delivery()
        for n in range(BACKLOG):
            channel.basic_publish(
                EXCHANGE,
                ROUTING_KEY,
                json.dumps({"contract": n}).encode(),
                pika.BasicProperties(
                    content_type="application/json", delivery_mode=2, message_id=f"c-{n}"
                ),
            )
    print(f"demo: published {BACKLOG} contracts to {EXCHANGE} -> {QUEUE}")
    print(f"demo: relaying to a slow, flaky web service at {target}\n", flush=True)

    relay = subprocess.Popen(
        [
            sys.executable, "-m", "steadyrabbit", "relay", QUEUE, target,
            "--url", URL, "--exchange", EXCHANGE, "--routing-key", ROUTING_KEY,
            "--concurrency", "4", "--heartbeat", "5", "--timeout", "10",
            "--max-attempts", "3", "--retry-delay", "0.5,1",
        ]
    )
    try:
        while True:
            with pika.BlockingConnection(pika.URLParameters(URL)) as connection:
                left = connection.channel().queue_declare(QUEUE, passive=True).method
            if left.message_count == 0 and relay.poll() is None:
                with Service.lock:
                    handled = len(Service.received)
                with pika.BlockingConnection(pika.URLParameters(URL)) as connection:
                    dead = connection.channel().queue_declare(f"{QUEUE}.dlq", passive=True)
                if handled + dead.method.message_count >= BACKLOG:
                    break
            if relay.poll() is not None:
                print("demo: the relay exited early", file=sys.stderr)
                return 1
            time.sleep(0.3)
        relay.send_signal(signal.SIGTERM)
        status = relay.wait(timeout=60)
    finally:
        if relay.poll() is None:
            relay.kill()
        server.shutdown()

    with pika.BlockingConnection(pika.URLParameters(URL)) as connection:
        channel = connection.channel()
        in_queue = channel.queue_declare(QUEUE, passive=True).method.message_count
        dead_letters = channel.queue_declare(f"{QUEUE}.dlq", passive=True).method.message_count
        reasons = set()
        while True:
            method, properties, _ = channel.basic_get(f"{QUEUE}.dlq", auto_ack=False)
            if method is None:
                break
            reasons.add(str((properties.headers or {}).get("x-steadyrabbit-reason")))
        channel.queue_delete(QUEUE)
        channel.queue_delete(f"{QUEUE}.dlq")
        channel.exchange_delete(EXCHANGE)
        for ms in (500, 1000):
            channel.queue_delete(f"{QUEUE}.retry.{ms}ms")
    delivered = len(set(Service.received))
    retried = len(set(Service.failed) & set(Service.received))
    lost = BACKLOG - delivered - dead_letters - in_queue
    print(
        f"\ndemo: summary: delivered {delivered} ({retried} after a retry), dead-lettered "
        f"{dead_letters}, left in queue {in_queue}, lost {lost}; relay exit status {status}"
    )
    for reason in sorted(reasons):
        print(f"demo:   dead-letter reason: {reason}")
    return 0 if lost == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
