"""Deliveries read straight from the socket's bytes: the consumer's hot path.

pika turns every frame into an object, looks for callbacks registered for it, and passes
content frames through a per-channel assembler before the consumer sees a message: at W1 that
was about three quarters of a consumer's CPU (BENCHMARKS.md, "Where the time goes"). Almost
every frame a consumer reads belongs to a delivery, and RabbitMQ writes each delivery's frames
(``basic.deliver``, the content header, the body frames) back to back.

:class:`DeliveryReader` takes the place of pika's ``_on_data_available`` on one connection. A
delivery whose frames are all in the buffer, one after the other, for a consumer pika knows,
goes from the bytes to the consumer's callback in one pass, with the same arguments pika would
give it. Every other frame - methods, heartbeats, a delivery for a cancelled consumer, anything
odd or malformed - goes through pika's own decoder and dispatcher, one frame at a time, so
pika's state (its callbacks, channels, the byte count its heartbeat checker and
``AmqpConnection._watch_reads`` read) stays what pika keeps itself. A delivery that is not all
in yet waits for the next read, as pika's own buffer would.

This reads pika's private attributes (``_frame_buffer``, ``_channels``, a channel's
``_consumers``, ``_cancelled`` and content assembler); :func:`read_deliveries` checks that they
are there (pika 1.3 and 1.4 have them) and leaves pika alone otherwise.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

import pika.frame
import pika.spec

_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = 0xCE
_BASIC_CLASS = 60
_DELIVER = b"\x00\x3c\x00\x3c"  # basic (60) . deliver (60)
# Type, channel, payload size; the payload and a frame-end octet follow.
_FRAME_HEAD = struct.Struct(">BHI")
# Class, weight, body size, the first property-flags word (its low bit: another word follows).
_CONTENT_HEAD = struct.Struct(">HHQH")
_DELIVERY_TAG = struct.Struct(">QB")  # delivery tag, then the redelivered bit
# A delivery not all in yet is held until it is, up to this many bytes: a larger one goes
# through pika frame by frame, which never holds more than a frame (holding it whole would copy
# the growing buffer on every read).
_HOLD_AT_MOST = 256 * 1024

_Deliver: Any = pika.spec.Basic.Deliver  # its stubs want str where pika gives bytes too
_Properties = pika.spec.BasicProperties


class _Reset:
    """Put in pika's ``_frame_buffer`` while a read is processed: pika replaces it with
    ``bytes()`` when the connection's state is reset (the stream ended), which tells the
    reader to drop the rest of what it read."""


def read_deliveries(raw: Any) -> bool:
    """Have ``raw`` (an open pika connection) read deliveries with :class:`DeliveryReader`;
    False, leaving pika as it is, if this pika lacks what the reader relies on."""
    needed = ("_frame_buffer", "_channels", "_process_frame", "bytes_received", "frames_received")
    if not all(hasattr(raw, name) for name in needed) or not isinstance(raw._frame_buffer, bytes):
        return False
    raw._on_data_available = DeliveryReader(raw).feed
    return True


def _short_string(buffer: bytes, offset: int) -> tuple[str | bytes, int]:
    """An AMQP short string at ``offset``, decoded as pika does (bytes if not UTF-8)."""
    end = offset + 1 + buffer[offset]
    raw = buffer[offset + 1 : end]
    try:
        return raw.decode(), end
    except UnicodeDecodeError:
        return raw, end


class DeliveryReader:
    """Reads one pika connection's incoming bytes (see the module docstring)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def feed(self, data: bytes) -> None:
        raw = self._raw
        pending = raw._frame_buffer
        buffer = pending + data if pending else data
        size = len(buffer)
        offset = 0
        marker = _Reset()
        raw._frame_buffer = marker
        unpack_head = _FRAME_HEAD.unpack_from
        try:
            while size - offset >= 8:
                kind, number, length = unpack_head(buffer, offset)
                end = offset + length + 8
                if end > size:
                    break
                if kind == _FRAME_METHOD and buffer[offset + 7 : offset + 11] == _DELIVER:
                    taken = self._delivery(buffer, offset, end, size, number)
                    if taken is None:
                        break  # the rest of this delivery is still on its way
                    if taken:
                        after, callback, args = taken
                        offset = after  # consumed first, as pika does, should the callback raise
                        callback(*args)
                        if raw._frame_buffer is not marker:
                            return  # the callback ended the connection
                        continue
                # Anything else: pika's decoder and dispatcher, for this one frame.
                consumed, frame = pika.frame.decode_frame(buffer[offset:end])
                offset += consumed
                raw.bytes_received += consumed
                raw._process_frame(frame)
                if raw._frame_buffer is not marker:
                    return
        finally:
            if raw._frame_buffer is marker:
                raw._frame_buffer = buffer[offset:] if offset < size else b""

    def _delivery(
        self, buffer: bytes, offset: int, end: int, size: int, number: int
    ) -> tuple[int, Any, tuple[Any, ...]] | Literal[False] | None:
        """The delivery whose ``basic.deliver`` frame spans ``offset:end``: (where it ends,
        the consumer's callback, its arguments); None if its frames are not all in yet (and it is
        small enough to hold); False for pika to handle, one frame at a time."""
        raw = self._raw
        channel = raw._channels.get(number)
        # pika in the middle of a message on this channel, or a frame it must judge itself.
        if (
            channel is None
            or channel._content_assembler._method_frame is not None
            or buffer[end - 1] != _FRAME_END
        ):
            return False
        try:
            consumer_tag, at = _short_string(buffer, offset + 11)
            delivery_tag, bits = _DELIVERY_TAG.unpack_from(buffer, at)
            exchange, at = _short_string(buffer, at + 9)
            routing_key, at = _short_string(buffer, at)
        except (IndexError, struct.error):
            return False
        if at != end - 1:
            return False
        consumer = channel._consumers.get(consumer_tag)
        if consumer is None or consumer_tag in channel._cancelled:
            return False  # pika rejects it or logs it
        incomplete: Literal[False] | None = None if size - offset <= _HOLD_AT_MOST else False
        # The content header.
        if size - end < 8:
            return incomplete
        kind, header_channel, length = _FRAME_HEAD.unpack_from(buffer, end)
        header_end = end + length + 8
        if kind != _FRAME_HEADER or header_channel != number or length < 14:
            return False
        if header_end > size:
            return incomplete
        if buffer[header_end - 1] != _FRAME_END:
            return False
        class_id, _weight, body_size, flags = _CONTENT_HEAD.unpack_from(buffer, end + 7)
        if class_id != _BASIC_CLASS:
            return False
        properties = _Properties()
        if flags:
            try:
                properties.decode(buffer[end + 19 : header_end - 1])
            except Exception:  # noqa: BLE001 - malformed: pika's own decoder raises it
                return False
        # The body frames.
        at = header_end
        remaining = body_size
        parts: list[bytes] = []
        while remaining > 0:
            if size - at < 8:
                return incomplete
            kind, body_channel, length = _FRAME_HEAD.unpack_from(buffer, at)
            body_end = at + length + 8
            if kind != _FRAME_BODY or body_channel != number or length > remaining:
                return False
            if body_end > size:
                return incomplete
            if buffer[body_end - 1] != _FRAME_END:
                return False
            parts.append(buffer[at + 7 : body_end - 1])
            remaining -= length
            at = body_end
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        raw.bytes_received += at - offset
        raw.frames_received += 2 + len(parts)
        method = _Deliver(consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)
        return at, consumer, (channel, method, properties, body)
