"""Reading evaluation data: .txt (one document), .jsonl (one per line), or stdin, streamed.

A data file is read twice, never held whole: once when it is opened (hash, sizes, word count and
every error, before the model loads), and again while it is scored, one block of text at a time,
so memory does not grow with its size. Stdin is copied to a temporary file to be read again.
Invalid UTF-8 becomes U+FFFD with a warning (never silently); a file that looks binary (NUL
bytes) or holds no text is an error naming the file; a bad JSONL line is an error naming it.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import shutil
import sys
import tempfile
import warnings
from typing import BinaryIO, Iterator

from .errors import MambaError

BLOCK = 1 << 20  # bytes read at a time


class DataFile:
    """One --data argument: its documents, re-read on demand, and what the report says about it."""

    def __init__(self, name: str, text_field: str = "text"):
        self.path, self.text_field = name, text_field
        self.label = "stdin" if name == "-" else name
        self._file = _open(name)
        head = self._file.read(65536)
        if b"\x00" in head:
            raise MambaError(f"--data {name}: looks like a binary file (NUL bytes); give UTF-8 text (.txt) or JSON lines (.jsonl)")
        digest, self.bytes = hashlib.sha256(), 0
        strict, invalid_utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict"), False
        for raw in self._raw():  # one pass: hash, size and UTF-8 validity
            digest.update(raw)
            self.bytes += len(raw)
            invalid_utf8 = invalid_utf8 or not _decodes(strict, raw)
        invalid_utf8 = invalid_utf8 or not _decodes(strict, b"", final=True)
        self.sha256 = digest.hexdigest()
        self.documents = self.words = self.text_bytes = 0
        for pieces in self.texts():
            self.documents += 1
            for piece, words in _words_in(pieces):
                self.words += words
                self.text_bytes += len(piece.encode("utf-8", "surrogatepass"))
        if not self.words:
            raise MambaError(f"--data {name}: holds no text to evaluate")
        if invalid_utf8:
            warnings.warn(f"{self.label} is not valid UTF-8; invalid bytes were replaced with U+FFFD")

    def texts(self) -> Iterator[Iterator[str]]:
        """Each document as an iterator over pieces of its text, read from the file again."""
        if self.path.endswith(".jsonl"):
            yield from self._jsonl()
        else:
            yield self._decoded()

    def _raw(self) -> Iterator[bytes]:
        self._file.seek(0)
        while raw := self._file.read(BLOCK):
            yield raw

    def _decoded(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for raw in self._raw():
            if piece := decoder.decode(raw):
                yield piece
        if tail := decoder.decode(b"", final=True):
            yield tail

    def _jsonl(self) -> Iterator[Iterator[str]]:
        self._file.seek(0)
        for number, line in enumerate(self._file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as exc:
                raise MambaError(f"{self.path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(self.text_field), str):
                raise MambaError(f"{self.path}:{number}: no string field '{self.text_field}' (choose the field with --text-field)")
            yield iter((row[self.text_field],))


def _decodes(decoder: codecs.IncrementalDecoder, raw: bytes, final: bool = False) -> bool:
    """Whether `raw` continues valid UTF-8 (a strict incremental decoder)."""
    try:
        decoder.decode(raw, final=final)
    except UnicodeDecodeError:
        return False
    return True


def _words_in(pieces: Iterator[str]) -> Iterator[tuple[str, int]]:
    """(piece, words starting in it): whitespace-separated words, counted across piece boundaries."""
    after_space = True
    for piece in pieces:
        words = len(piece.split())
        if words and not after_space and not piece[0].isspace():
            words -= 1  # the first word continues the previous piece's last one
        after_space = piece[-1].isspace() if piece else after_space
        yield piece, words


def _open(name: str) -> BinaryIO:
    if name == "-":
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(sys.stdin.buffer, spool, BLOCK)
        return spool
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise MambaError(f"--data {name}: no such file") from None
    except IsADirectoryError:
        raise MambaError(f"--data {name}: is a directory; give a .txt or .jsonl file") from None
    except OSError as exc:
        raise MambaError(f"--data {name}: cannot read ({exc.strerror})") from None


def read_data_file(name: str, text_field: str = "text") -> DataFile:
    """Open and check one data file ('-' for stdin)."""
    return DataFile(name, text_field)
