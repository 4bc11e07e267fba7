"""Middleware: the one extension point, on the real broker, and its dispatch without one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from steadyrabbit import (
    App,
    Decision,
    Message,
    Middleware,
    Outcome,
    Publish,
    Reject,
    Retry,
    RetryPolicy,
    Worker,
)
from steadyrabbit._middleware import CallNext, Hooks, PublishNext, RedeliveryNext
from steadyrabbit._url import BrokerAddress
from steadyrabbit._view import WorkerView
from tests.conftest import Admin, MakeSettings, Settled

pytestmark = pytest.mark.anyio


class Recorder(Middleware):
    """Sees every message's decision and the worker's lifecycle; an ``on_settled`` event per
    message replaces polling the broker."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.settled: list[tuple[bytes, Decision]] = []
        self.connected: list[str] = []
        self.changed = asyncio.Event()

    async def around_handler(self, message: Message, call_next: CallNext) -> Any:
        self.log.append(f"{self.name} before")
        try:
            return await call_next(message)
        finally:
            self.log.append(f"{self.name} after")

    def on_settled(self, message: Message, decision: Decision) -> None:
        self.settled.append((message.body, decision))
        self.changed.set()

    def on_connected(self, role: str, address: BrokerAddress) -> None:
        self.connected.append(role)

    async def on_worker_start(self, worker: WorkerView) -> None:
        self.log.append(f"{self.name} start {len(worker.consumers)}")

    async def on_worker_stop(self, worker: WorkerView) -> None:
        self.log.append(f"{self.name} stop")

    async def settled_count(self, count: int) -> None:
        while len(self.settled) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)


async def test_a_middleware_sees_every_decision_in_order_around_the_handler(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """App middleware wraps the consumer's own; before-hooks in list order, after-hooks in
    reverse; on_settled gets outcome, reason, attempt and target for every message."""
    admin.declare(queue_name)
    log: list[str] = []
    outer, inner, own = Recorder("outer", log), Recorder("inner", log), Recorder("own", log)
    app = App(middleware=[outer, inner], retry=RetryPolicy(max_attempts=2, delays=(0.05,)))

    @app.consumer(queue_name, middleware=[own])
    async def handle(message: Message) -> None:
        log.append(f"handler {message.body.decode()}")
        if message.body == b"reject":
            raise Reject("not for us")
        if message.body == b"retry" and message.attempt == 1:
            raise Retry("later", delay=0.05)
        if message.body == b"fail":
            raise ValueError("broken")

    try:
        async with Worker(app, make_settings()):
            await admin.run(admin.publish, queue_name, [b"ok"])
            await outer.settled_count(1)
            await admin.run(admin.publish, queue_name, [b"reject", b"retry", b"fail"])
            await outer.settled_count(6)  # ok, reject, retry x2, fail x2
    finally:
        admin.delete(f"{queue_name}.retry.50ms")
    assert log[:8] == [
        "outer start 1", "inner start 1", "own start 1",
        "outer before", "inner before", "own before", "handler ok", "own after",
    ]
    assert log[8:10] == ["inner after", "outer after"]
    assert log[-3:] == ["own stop", "inner stop", "outer stop"]
    assert sorted(outer.connected) == ["consume", "publish"]
    decisions = {(body, d.attempt): d for body, d in outer.settled}
    assert decisions[(b"ok", 1)] == Decision(Outcome.ACK, 1)
    rejected = decisions[(b"reject", 1)]
    assert rejected.outcome is Outcome.DEAD_LETTER
    assert rejected.reason == "not for us"
    assert rejected.target == f"{queue_name}.dlq"
    assert decisions[(b"retry", 1)].outcome is Outcome.RETRY
    assert decisions[(b"retry", 1)].target == f"{queue_name}.retry.50ms"
    assert decisions[(b"retry", 2)].outcome is Outcome.ACK
    assert decisions[(b"fail", 2)].reason == "gave up after 2 attempts: ValueError: broken"
    assert [d for _, d in inner.settled] == [d for _, d in outer.settled]


class Broken(Middleware):
    def on_settled(self, message: Message, decision: Decision) -> None:
        raise RuntimeError("an observer's bug")

    def on_connected(self, role: str, address: BrokerAddress) -> None:
        raise RuntimeError("another one")


async def test_a_failing_observer_is_logged_and_changes_nothing(
    queue_name: str, admin: Admin, caplog: pytest.LogCaptureFixture, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    log: list[str] = []
    recorder = Recorder("after", log)
    app = App(middleware=[Broken(), recorder])
    app.add_consumer(lambda message: None, queue_name)

    async with Worker(app, make_settings()):
        await admin.run(admin.publish, queue_name, [b"a", b"b"])
        await recorder.settled_count(2)
    assert [d.outcome for _, d in recorder.settled] == [Outcome.ACK, Outcome.ACK]
    assert admin.counts(queue_name) == (0, 0)
    failures = [r for r in caplog.records if "middleware Broken failed" in r.getMessage()]
    assert {r.getMessage().rpartition(" in ")[2] for r in failures} == {
        "on_settled (ignored)", "on_connected (ignored)",
    }


class Idempotent(Middleware):
    """Short-circuits messages it has seen: the handler does not run, the message is acked."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    async def around_handler(self, message: Message, call_next: CallNext) -> Any:
        if message.body in self.seen:
            return None
        self.seen.add(message.body)
        return await call_next(message)


class Stamp(Middleware):
    async def around_publish(self, publish: Publish, call_next: PublishNext) -> None:
        publish.headers["x-trace"] = f"copy to {publish.routing_key}"
        await call_next(publish)


async def test_around_handler_may_skip_the_handler_and_around_publish_sees_every_copy(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    admin.declare(queue_name)
    log: list[str] = []
    recorder = Recorder("r", log)
    runs: list[bytes] = []
    app = App(middleware=[recorder, Idempotent(), Stamp()])

    @app.consumer(queue_name)
    async def handle(message: Message) -> None:
        runs.append(message.body)
        if message.body == b"bad":
            raise Reject("bad")

    async with Worker(app, make_settings()):
        await admin.run(admin.publish, queue_name, [b"once", b"once", b"bad"])
        await recorder.settled_count(3)
    assert runs == [b"once", b"bad"]
    assert [d.outcome for _, d in recorder.settled] == [
        Outcome.ACK, Outcome.ACK, Outcome.DEAD_LETTER,
    ]
    [(props, _body)] = admin.drain(f"{queue_name}.dlq")
    assert (props.headers or {})["x-trace"] == f"copy to {queue_name}.dlq"


class RedeliveryRecorder(Middleware):
    """Sees redeliveries only; ends ``end`` without running it, fails around ``boom-*``."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []
        self.returned: dict[bytes, bool] = {}

    async def around_redelivery(self, message: Message, call_next: RedeliveryNext) -> bool:
        self.seen.append((message.body, message.redelivered))
        if message.body == b"boom-before":
            raise RuntimeError("the middleware broke before the handler")
        if message.body == b"end":
            result = await call_next(message, end_with=Reject("ended by the middleware"))
        else:
            result = await call_next(message)
        self.returned[message.body] = result
        if message.body == b"boom-after":
            raise RuntimeError("the middleware broke after the settlement")
        return result


async def redeliver(
    app_queue: str, admin: Admin, make_settings: MakeSettings, bodies: list[bytes]
) -> None:
    """Start each message on a worker that is then aborted: the broker redelivers them all."""
    first = App()
    started: list[bytes] = []
    all_started = asyncio.Event()

    @first.consumer(app_queue, concurrency=len(bodies), prefetch=len(bodies))
    async def hang(message: Message) -> None:
        started.append(message.body)
        if len(started) == len(bodies):
            all_started.set()
        await asyncio.Event().wait()

    worker = Worker(first, make_settings())
    await worker.start()
    try:
        await admin.run(admin.publish, app_queue, bodies)
        await asyncio.wait_for(all_started.wait(), 30)
    finally:
        await worker.abort()


async def test_around_redelivery_sees_only_redeliveries_and_may_end_them_without_running(
    queue_name: str, admin: Admin, make_settings: MakeSettings
) -> None:
    """The hook runs for redeliveries only, outside around_handler; ``end_with`` settles
    without the handler; a failure before the settlement fails the message as the handler's
    would (here: dead-lettered), one after it is logged and changes nothing."""
    admin.declare(queue_name)
    redelivered = [b"a", b"end", b"boom-before", b"boom-after"]
    await redeliver(queue_name, admin, make_settings, redelivered)
    recorder, settled = RedeliveryRecorder(), Settled()
    runs: list[bytes] = []
    app = App(middleware=[settled, recorder], retry=RetryPolicy(max_attempts=1))

    @app.consumer(queue_name, concurrency=4)
    async def handle(message: Message) -> None:
        runs.append(message.body)

    async with Worker(app, make_settings()) as worker:
        await settled.wait_for(4)
        await admin.run(admin.publish, queue_name, [b"fresh"])
        await settled.wait_for(5)
        assert worker.stats.channel_recoveries == 0, "nothing was settled twice"
    assert sorted(recorder.seen) == sorted((body, True) for body in redelivered)
    assert sorted(runs) == [b"a", b"boom-after", b"fresh"]
    assert recorder.returned == {b"a": True, b"end": True, b"boom-after": True}
    outcomes = {body: d.outcome for body, d in settled.decisions}
    assert outcomes == {
        b"a": Outcome.ACK,
        b"end": Outcome.DEAD_LETTER,
        b"boom-before": Outcome.DEAD_LETTER,
        b"boom-after": Outcome.ACK,
        b"fresh": Outcome.ACK,
    }
    reasons = {
        body: (props.headers or {}).get("x-steadyrabbit-reason")
        for props, body in admin.drain(f"{queue_name}.dlq")
    }
    assert reasons[b"end"] == "ended by the middleware"
    assert "the middleware broke before the handler" in str(reasons[b"boom-before"])
    assert admin.counts(queue_name) == (0, 0)


class OnlySettled(Middleware):
    def on_settled(self, message: Message, decision: Decision) -> None:
        pass


def test_dispatch_tables_hold_only_the_overridden_hooks() -> None:
    """An app without middleware pays nothing: empty tables, and the handler is not wrapped."""
    empty = Hooks([Middleware()])
    assert not empty.settled
    assert not empty.around_handler
    assert not empty.around_publish
    assert not empty.around_redelivery
    assert not empty.loop_blocked

    async def handler(message: Message) -> None:
        pass

    assert empty.wrap_handler(handler) is handler
    only = OnlySettled()
    hooks = Hooks([Middleware(), only])
    assert hooks.settled == (only,)
    assert not hooks.around_handler
    assert hooks.wrap_handler(handler) is handler


def test_middleware_must_be_middleware() -> None:
    from steadyrabbit import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"instances of steadyrabbit\.Middleware"):
        App(middleware=[object()])  # type: ignore[list-item]
