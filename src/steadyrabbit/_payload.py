"""Typed payloads: a handler whose first parameter is annotated with a pydantic model, a
dataclass, a ``TypedDict`` (or any type pydantic validates) receives the decoded, validated
object; a second parameter, if it has one, receives the :class:`Message`.

A body that does not validate is dead-lettered at once (:class:`Reject`), never retried: the
same bytes would fail the same way. The reason lists each error by field path and what was
wrong with it, never the value, which may be personal or secret::

    invalid payload (2 errors): items.0.qty: Input should be a valid integer [int_parsing];
    customer: Field required [missing]

pydantic is imported when the first typed handler is registered, not with steadyrabbit.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from ._errors import ConfigurationError, Reject
from ._message import Message

Decoder = Callable[[bytes], Any]

#: Errors named in a dead letter's reason; the rest are counted.
_SHOWN_ERRORS = 10


class TypedHandler:
    """How to call a handler with a typed first parameter."""

    def __init__(self, fn: Callable[..., Any], annotation: Any, with_message: bool) -> None:
        self.fn = fn
        self.annotation = annotation
        self.with_message = with_message

    def call(self, message: Message) -> Any:
        """``fn(payload)`` or ``fn(payload, message)``: sync, or the coroutine of an async fn."""
        if self.with_message:
            return self.fn(message.payload, message)
        return self.fn(message.payload)

    def validator(self, decode: Decoder | None) -> Decoder:
        """Body -> validated object; raises :class:`Reject` with the errors by field path."""
        from pydantic import TypeAdapter, ValidationError

        try:
            adapter: TypeAdapter[Any] = TypeAdapter(self.annotation)
            # A model with a forward reference nothing defines would fail every message: fail
            # its registration instead.
            if not adapter.pydantic_complete:
                adapter.rebuild(raise_errors=True)
        except Exception as exc:  # pydantic has many schema errors: one sentence for any
            raise ConfigurationError(
                f"handler {_name(self.fn)}: pydantic cannot validate its parameter type "
                f"{self.annotation!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
            ) from exc
        if not adapter.pydantic_complete:
            raise ConfigurationError(
                f"handler {_name(self.fn)}: the type {self.annotation!r} of its parameter is "
                f"not fully defined (a forward reference to a type defined nowhere?)"
            )

        def validate(body: bytes) -> Any:
            try:
                if decode is None:
                    return adapter.validate_json(body)
                return adapter.validate_python(decode(body))
            except ValidationError as exc:
                raise Reject(describe(exc)) from None

        return validate


def describe(error: Any) -> str:
    """A pydantic ``ValidationError`` as a dead letter's reason: paths and messages only."""
    errors = error.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for item in errors[:_SHOWN_ERRORS]:
        path = ".".join(str(part) for part in item["loc"]) or "(the body)"
        parts.append(f"{path}: {item['msg']} [{item['type']}]")
    more = len(errors) - _SHOWN_ERRORS
    if more > 0:
        parts.append(f"and {more} more")
    count = f"{len(errors)} error" + ("s" if len(errors) != 1 else "")
    return f"invalid payload ({count}): " + "; ".join(parts)


def typed_handler(fn: Callable[..., Any]) -> TypedHandler | None:
    """The typed call of ``fn``, or None if its first parameter takes the :class:`Message`
    (annotated so, or not at all)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None  # a builtin or a C callable: called with the message
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not positional:
        return None
    first = positional[0]
    if first.annotation is first.empty:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # NameError, TypeError...: say which annotation failed
        if _names_message(first.annotation):
            return None
        raise ConfigurationError(
            f"handler {_name(fn)}: cannot resolve the annotation {first.annotation!r} of "
            f"its parameter {first.name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    annotation = hints.get(first.name, Any)
    if annotation is Any or _is_message(annotation):
        return None
    return TypedHandler(fn, annotation, with_message=len(positional) >= 2)


def _is_message(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Message)


def _names_message(annotation: object) -> bool:
    return isinstance(annotation, str) and annotation.rpartition(".")[2] == "Message"


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
