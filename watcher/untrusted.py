"""Text another user controls (argv, paths, comm), made safe to put in a log line. Pure.

Root logs on behalf of untrusted processes: a newline in an argument would forge a whole
log line, an escape sequence would repaint the operator's terminal, and a 120 KB path per
exec would fill the log's size bound in a hundred execs. So every such field is shown
escaped (control characters as \\n, \\x1b, ...) and cut to a bound, saying how much was cut.
"""

from __future__ import annotations

FIELD_MAX_CHARS = 256  # a long real path fits; a flood does not
MESSAGE_MAX_CHARS = 4096  # the last bound, on a whole formatted log message

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped_char(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    # C0, DEL, C1 controls and lone surrogates (undecodable bytes from /proc).
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if 0xD800 <= code < 0xE000:
        return f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}"
    if code in (0x2028, 0x2029, 0x85):  # line and paragraph separators
        return f"\\u{code:04x}"
    return char


def escape(text: str) -> str:
    """`text` with every control character spelled out; printable text is unchanged."""
    if text.isprintable():
        return text  # the common case, without a per-character loop
    return "".join(_escaped_char(c) for c in text)


def shown(text: object, limit: int = FIELD_MAX_CHARS) -> str:
    """`text` escaped and cut to `limit` characters, saying how many were cut."""
    value = escape(str(text))
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...(+{len(value) - limit} chars)"


def shown_argv(argv: list[str], limit: int = FIELD_MAX_CHARS) -> str:
    return shown(" ".join(argv), limit)
