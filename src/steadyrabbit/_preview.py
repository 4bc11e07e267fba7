"""Message bodies (and other untrusted text) shortened and made printable for one line of a
table, a log or an alert."""

from __future__ import annotations

__all__ = ["PREVIEW_CHARS", "body_preview"]

PREVIEW_CHARS = 80
_ELLIPSIS = "..."


def _escape(char: str) -> str:
    if char.isprintable():
        return char
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def body_preview(data: bytes | str, limit: int = PREVIEW_CHARS) -> str:
    """At most ``limit`` characters of ``data``: printable text, everything else escaped.

    Bytes that are not UTF-8 show as ``\\xNN``; a cut preview ends in ``...`` (counted in the
    limit), and an escape sequence is never cut in half.
    """
    text = data.decode("utf-8", errors="backslashreplace") if isinstance(data, bytes) else data
    pieces = [_escape(char) for char in text[: limit + 1]]
    if sum(len(piece) for piece in pieces) <= limit and len(text) <= limit:
        return "".join(pieces)
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > limit - len(_ELLIPSIS):
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + _ELLIPSIS
