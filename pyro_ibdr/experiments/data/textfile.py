"""Text files as people save them: UTF-8 with or without a byte-order mark, UTF-16/32 with one, any line ending."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

# UTF-32-LE's mark starts with UTF-16-LE's, so it is tried first.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _line_number(text_before: str) -> int:
    return len(_LINE_BREAK.split(text_before))


def read_lines(path: str | Path) -> list[str]:
    """The lines of a text file without their line endings (``\\n``, ``\\r\\n`` or ``\\r``; no others, so a path
    holding e.g. U+2028 stays one line).

    The encoding is UTF-32 or UTF-16 when the file starts with their byte-order mark, otherwise UTF-8 (a UTF-8
    mark is dropped). Legacy 8-bit encodings (Latin-1, cp1252) are not guessed: a wrong guess would give paths
    that exist nowhere.

    :raises FileNotFoundError: when ``path`` is not a file.
    :raises ValueError: naming the file and the 1-based line of the first bytes that are not valid in the
        encoding, or of a NUL character (a UTF-16 file saved without a byte-order mark).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    raw = path.read_bytes()
    mark, encoding = next(((m, name) for m, name in _BYTE_ORDER_MARKS if raw.startswith(m)), (b"", "utf-8"))
    raw = raw[len(mark) :]
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = _line_number(raw[: err.start].decode(encoding, errors="replace"))
        raise ValueError(
            f"{path}:{line}: bytes {raw[err.start : err.end]!r} are not valid {encoding.upper()} ({err.reason}); "
            "save the file as UTF-8"
        ) from None
    if "\x00" in text:
        line = _line_number(text[: text.index("\x00")])
        raise ValueError(
            f"{path}:{line}: NUL character in the text (UTF-16 saved without a byte-order mark?); save the file as "
            "UTF-8"
        )
    lines = _LINE_BREAK.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines
