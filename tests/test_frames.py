"""The delivery reader (``_frames.DeliveryReader``) against pika's own frame path.

The same byte stream - deliveries on two channels, bodies split over several body frames,
heartbeats and other methods in between, deliveries for a cancelled or an unknown consumer -
goes once through pika's ``_on_data_available`` and once through the reader, cut into reads
at arbitrary points. Both run pika's real connection and channel code (its decoder, callback
manager, content assembler and ``_on_deliver``) on a connection without a socket; the consumer
callbacks, rejects, heartbeats, methods and byte counts they produce must be the same. The
real broker's side is in ``test_a_worker_receives_what_was_published_byte_for_byte``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.callback
import pika.channel
import pika.connection
import pika.frame
import pika.spec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steadyrabbit import App, Message, Settings, Worker
from steadyrabbit._amqp import AmqpConnection
from steadyrabbit._frames import _HOLD_AT_MOST, DeliveryReader, read_deliveries
from steadyrabbit._url import parse_url
from tests._strategies import HEADER_VALUES
from tests.conftest import MAIN_URL, Admin, MakeSettings, eventually

FRAME_MAX = 4096  # small, so that bodies of a few KB already span several body frames
# pika's classes, for their private receiving methods (not in its type stubs).
_PIKA_CONNECTION: Any = pika.connection.Connection
_PIKA_CHANNEL: Any = pika.channel.Channel
KNOWN, CANCELLED, UNKNOWN = "ctag-known", "ctag-cancelled", "ctag-unknown"


class _Channel:
    """A pika channel's receiving half: pika's own methods on recorded state."""

    _handle_content_frame = _PIKA_CHANNEL._handle_content_frame
    _on_deliver = _PIKA_CHANNEL._on_deliver

    def __init__(self, number: int, log: list[tuple[Any, ...]]) -> None:
        self.channel_number = number
        self._log = log
        self._content_assembler = pika.channel.ContentFrameAssembler()
        self._cancelled = {CANCELLED}
        self._consumers_with_noack: set[str] = set()
        self._consumers = {KNOWN: self._consume, CANCELLED: self._consume}
        self.is_open = True

    def _consume(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        assert channel is self
        self._log.append(
            (
                "deliver",
                self.channel_number,
                type(method),
                vars(method),
                type(properties),
                vars(properties),
                body,
            )
        )

    def basic_reject(self, delivery_tag: int) -> None:
        self._log.append(("reject", self.channel_number, delivery_tag))

    def _on_unexpected_frame(self, frame: Any) -> None:
        self._log.append(("unexpected", self.channel_number, repr(frame)))

    def _on_getok(self, *args: Any) -> None:  # pragma: no cover - never sent here
        raise AssertionError(args)

    _on_return = _on_getok


class _Connection:
    """A pika connection without a socket: pika's own receiving methods."""

    _on_data_available = _PIKA_CONNECTION._on_data_available
    _read_frame = _PIKA_CONNECTION._read_frame
    _trim_frame_buffer = _PIKA_CONNECTION._trim_frame_buffer
    _process_frame = _PIKA_CONNECTION._process_frame
    _process_callbacks = _PIKA_CONNECTION._process_callbacks
    _is_method_frame = _PIKA_CONNECTION._is_method_frame
    _has_pending_callbacks = _PIKA_CONNECTION._has_pending_callbacks
    _deliver_frame_to_channel = _PIKA_CONNECTION._deliver_frame_to_channel

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames_received = 0
        self._heartbeat_checker = self
        self.callbacks = pika.callback.CallbackManager()
        self._channels = {n: _Channel(n, self.log) for n in (1, 2)}
        for number in self._channels:
            self.callbacks.add(number, pika.spec.Basic.QosOk, self._qos_ok, one_shot=False)

    def received(self) -> None:  # the heartbeat checker's
        self.log.append(("heartbeat",))

    def _qos_ok(self, frame: Any) -> None:
        self.log.append(("qos-ok", frame.channel_number))


@dataclass
class _Delivery:
    channel: int
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: pika.spec.BasicProperties
    body: bytes
    # Frames of other kinds the broker could write between this delivery's own frames.
    interleave_after_header: list[bytes] = field(default_factory=list)

    def frames(self) -> bytes:
        method = pika.spec.Basic.Deliver(
            self.consumer_tag, self.delivery_tag, self.redelivered, self.exchange, self.routing_key
        )
        parts = [
            pika.frame.Method(self.channel, method).marshal(),
            pika.frame.Header(self.channel, len(self.body), self.properties).marshal(),
            *self.interleave_after_header,
        ]
        step = FRAME_MAX - 8
        parts += [
            pika.frame.Body(self.channel, self.body[at : at + step]).marshal()
            for at in range(0, len(self.body), step)
        ]
        return b"".join(parts)


short_text = st.text(st.characters(codec="utf-8"), max_size=12)
properties = st.builds(
    pika.spec.BasicProperties,
    content_type=st.none() | short_text,
    content_encoding=st.none() | short_text,
    headers=st.none() | st.dictionaries(short_text, HEADER_VALUES, max_size=4),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | short_text,
    reply_to=st.none() | short_text,
    expiration=st.none() | st.integers(0, 10**6).map(str),
    message_id=st.none() | short_text,
    timestamp=st.none() | st.integers(0, 2**40),
    type=st.none() | short_text,
    user_id=st.none() | short_text,
    app_id=st.none() | short_text,
)
bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=FRAME_MAX - 8, max_size=3 * FRAME_MAX),  # several body frames
)
OTHER_FRAMES = st.sampled_from(
    [
        pika.frame.Heartbeat().marshal(),
        pika.frame.Method(1, pika.spec.Basic.QosOk()).marshal(),
        pika.frame.Method(2, pika.spec.Basic.QosOk()).marshal(),
    ]
)
deliveries = st.builds(
    _Delivery,
    channel=st.sampled_from([1, 2]),
    consumer_tag=st.sampled_from([KNOWN, KNOWN, KNOWN, CANCELLED, UNKNOWN]),
    delivery_tag=st.integers(1, 2**64 - 1),
    redelivered=st.booleans(),
    exchange=short_text,
    routing_key=short_text,
    properties=properties,
    body=bodies,
    interleave_after_header=st.lists(OTHER_FRAMES, max_size=1),
)
streams = st.lists(st.one_of(deliveries, OTHER_FRAMES), min_size=1, max_size=12)


def _stream(items: list[_Delivery | bytes]) -> bytes:
    return b"".join(item if isinstance(item, bytes) else item.frames() for item in items)


def _through_pika(data: bytes) -> _Connection:
    connection = _Connection()
    connection._on_data_available(data)
    return connection


def _through_reader(data: bytes, cuts: list[int]) -> _Connection:
    connection = _Connection()
    assert read_deliveries(connection)
    at = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        if cut > at:
            connection._on_data_available(data[at:cut])
            at = cut
    return connection


def _same(reference: _Connection, reader: _Connection) -> None:
    assert reader.log == reference.log
    assert reader.bytes_received == reference.bytes_received
    assert reader.frames_received == reference.frames_received
    assert reader._frame_buffer == reference._frame_buffer == b""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=streams, cuts=st.lists(st.integers(0, 10**6), max_size=8))
def test_the_reader_gives_what_pikas_own_path_gives_however_the_bytes_are_cut(
    items: list[_Delivery | bytes], cuts: list[int]
) -> None:
    data = _stream(items)
    _same(_through_pika(data), _through_reader(data, cuts))


def test_one_byte_at_a_time() -> None:
    items: list[_Delivery | bytes] = [
        _Delivery(1, KNOWN, 7, False, "ex", "rk", pika.spec.BasicProperties(), b"x" * 9000),
        pika.frame.Heartbeat().marshal(),
        _Delivery(2, KNOWN, 8, True, "", "q", pika.spec.BasicProperties(headers={"a": 1}), b""),
    ]
    data = _stream(items)
    reference = _through_pika(data)
    assert [entry[0] for entry in reference.log] == ["deliver", "heartbeat", "deliver"]
    _same(reference, _through_reader(data, list(range(len(data)))))


def test_a_delivery_larger_than_the_hold_limit_goes_through_pika_frame_by_frame() -> None:
    big = _Delivery(
        1, KNOWN, 1, False, "", "q", pika.spec.BasicProperties(), b"b" * (_HOLD_AT_MOST * 2)
    )
    data = big.frames()
    reader = _Connection()
    read_deliveries(reader)
    chunk = 64 * 1024
    for at in range(0, len(data), chunk):
        reader._on_data_available(data[at : at + chunk])
        # Held whole up to the limit, then pika's assembler takes the frames as they come.
        assert len(reader._frame_buffer) <= _HOLD_AT_MOST + chunk < len(data)
    _same(_through_pika(data), reader)


def test_a_malformed_frame_end_is_pikas_error() -> None:
    data = bytearray(
        _Delivery(1, KNOWN, 1, False, "", "q", pika.spec.BasicProperties(), b"x").frames()
    )
    data[-1] = 0x00
    with pytest.raises(pika.exceptions.InvalidFrameError):
        _through_pika(bytes(data))
    with pytest.raises(pika.exceptions.InvalidFrameError):
        _through_reader(bytes(data), [])


def test_a_connection_without_what_the_reader_needs_is_left_to_pika() -> None:
    class Bare:
        _frame_buffer = b""

    bare = Bare()
    assert not read_deliveries(bare)
    assert "_on_data_available" not in vars(bare)


@pytest.mark.anyio
async def test_a_worker_receives_what_was_published_byte_for_byte(
    make_settings: MakeSettings, admin: Admin, queue_name: str
) -> None:
    """On the broker: bodies of every size around the broker's frame size (128 KiB) and the
    hold limit, with properties and headers, arrive as they were published."""
    sizes = [0, 1, 131_063, 131_064, 131_065, 300_000, _HOLD_AT_MOST + 1, 1_000_000]
    sent: dict[str, tuple[bytes, dict[str, Any]]] = {
        uuid.uuid4().hex: (bytes([n % 251]) * size, {"size": size, "text": "é" * (n + 1)})
        for n, size in enumerate(sizes)
    }
    got: dict[str, tuple[bytes, dict[str, Any], str | None]] = {}
    app = App()

    @app.consumer(queue_name, concurrency=4, prefetch=4)
    async def handle(message: Message) -> None:
        assert message.message_id is not None
        got[message.message_id] = (
            message.body,
            dict(message.headers),
            message.properties.content_type,
        )

    settings: Settings = make_settings()
    async with Worker(app, settings):
        for message_id, (body, headers) in sent.items():
            properties = pika.BasicProperties(
                message_id=message_id, headers=headers, content_type="application/x"
            )
            await admin.run(admin.publish, queue_name, [body], properties=properties)
        await eventually(lambda: len(got) == len(sent), what="every message")
    for message_id, (body, headers) in sent.items():
        assert got[message_id] == (body, headers, "application/x")


@pytest.mark.anyio
async def test_connections_to_the_broker_read_with_the_reader() -> None:
    """With the pika this project installs, every connection reads deliveries with the reader
    (``read_deliveries`` would leave an unknown pika to itself, silently slower)."""
    connection = await AmqpConnection.open(
        parse_url(MAIN_URL), heartbeat=10, connect_timeout=5, name="frames-test"
    )
    try:
        raw: Any = connection._raw
        reader = raw._on_data_available
        assert isinstance(getattr(reader, "__self__", None), DeliveryReader)
    finally:
        await connection.aclose()
