"""VTAB file lists as people save them: encodings, line endings, stray whitespace, blank lines."""

from __future__ import annotations

import codecs
import json

import pytest

from pyro_ibdr.experiments.data import read_file_list
from pyro_ibdr.experiments.data.textfile import read_lines

ENTRIES = [("images/a b.png", 3), ("images/café\u2028x.jpg", 0), ("images/ß/日本.png", 12)]
CLEAN = "".join(f"{path} {label}\n" for path, label in ENTRIES)

# (case, bytes of the file as some editor or system saves the clean list)
SAVED = [
    ("utf8-no-final-newline", CLEAN.rstrip("\n").encode()),
    ("utf8-bom", codecs.BOM_UTF8 + CLEAN.encode()),
    ("utf16-le-bom", CLEAN.encode("utf-16")),  # BOM + native order (little endian here)
    ("utf16-be-bom", codecs.BOM_UTF16_BE + CLEAN.encode("utf-16-be")),
    ("utf32-le-bom", codecs.BOM_UTF32_LE + CLEAN.encode("utf-32-le")),
    ("utf32-be-bom", codecs.BOM_UTF32_BE + CLEAN.encode("utf-32-be")),
    ("crlf", CLEAN.replace("\n", "\r\n").encode()),
    ("cr", CLEAN.replace("\n", "\r").encode()),
    ("utf16-crlf", CLEAN.replace("\n", "\r\n").encode("utf-16")),
    ("tabs", "".join(f"{p}\t{y}\n" for p, y in ENTRIES).encode()),
    ("stray-whitespace", "".join(f"  {p} \t {y} \t \n" for p, y in ENTRIES).encode()),
    ("blank-lines", ("\n \n\t\n" + CLEAN.replace("\n", "\n\n") + "   \n").encode()),
    ("bom-crlf-trailing", codecs.BOM_UTF8 + "".join(f"{p} {y}  \r\n\r\n" for p, y in ENTRIES).encode()),
]


@pytest.mark.parametrize("saved", [s for _, s in SAVED], ids=[c for c, _ in SAVED])
def test_saved_lists_give_the_clean_entries(tmp_path, saved):
    clean = tmp_path / "clean.txt"
    clean.write_bytes(CLEAN.encode())
    assert read_file_list(clean) == ENTRIES
    path = tmp_path / "saved.txt"
    path.write_bytes(saved)
    assert read_file_list(path) == ENTRIES


@pytest.mark.parametrize(("content", "fragment"), [
    ("images/a.png 1\nimages/caf\xe9.png 2\n".encode("latin-1"),  # a Latin-1 path
     r"list\.txt:2: bytes b'\\xe9' are not valid UTF-8 .*save the file as UTF-8"),
    (codecs.BOM_UTF16_LE + "a.png 1\r\nb.png 2\r\n".encode("utf-16-le") + b"\x00\xd8" + " 3".encode("utf-16-le"),
     r"list\.txt:3: bytes .* are not valid UTF-16-LE"),  # a lone surrogate
    (codecs.BOM_UTF8 + b"a.png 1\n\n\xff\xfe 2\n", r"list\.txt:3: bytes b'\\xff' are not valid UTF-8"),
    ("a.png 1\nb.png 2\n".encode("utf-16-le"), r"list\.txt:1: NUL character .*byte-order mark"),
    (b"a.png 1\nb.png 2\x00\n", r"list\.txt:2: NUL"),
    (b"a.png one\n", r"list\.txt:1: label 'one' is not an integer"),
    (b"a.png 1\nb.png +2\n", r"list\.txt:2: label '\+2' is not an integer"),
    (b"a.png 1_0\n", r"list\.txt:1: label '1_0' is not an integer"),
    ("a.png \u0663\n".encode(), r"list\.txt:1: label '\u0663' is not an integer"),  # Arabic-Indic three
    (b"a.png -1\n", r"list\.txt:1: negative label -1"),
    (b"a.png\n", r"list\.txt:1: expected '<image path> <label>'"),
    (b"\r\n \t\r\n", r"file list .*list\.txt is empty"),
    (codecs.BOM_UTF16_LE, r"file list .*list\.txt is empty"),
])
def test_undecodable_or_malformed_lists_name_the_file_and_line(tmp_path, content, fragment):
    path = tmp_path / "list.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=fragment):
        read_file_list(path)


def test_read_lines_splits_only_at_line_endings(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes("a\u2028b\x0bc\x0cd\x1ce\x85f\r\ng\rh\n\ni".encode())
    assert read_lines(path) == ["a\u2028b\x0bc\x0cd\x1ce\x85f", "g", "h", "", "i"]
    with pytest.raises(FileNotFoundError, match="gone"):
        read_lines(tmp_path / "gone.txt")


def test_jsonl_rows_saved_with_a_bom_and_crlf(tmp_path):
    from pyro_ibdr.experiments.data.commonsense import read_rows

    rows = [{"question": "Is it the sun?", "label": 1}, {"question": "café", "label": 0}]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    saved = tmp_path / "saved.jsonl"
    saved.write_bytes(codecs.BOM_UTF8 + clean.read_bytes().replace(b"\n", b"\r\n\r\n"))
    assert read_rows(clean) == read_rows(saved) == rows
    saved.write_bytes(clean.read_text(encoding="utf-8").encode("utf-16"))
    assert read_rows(saved) == rows
