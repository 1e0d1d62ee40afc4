"""Reading evaluation data: .txt (one document), .jsonl (one per line), or stdin.

Invalid UTF-8 becomes U+FFFD with a warning (never silently); a file that looks binary (NUL
bytes) or holds no text is an error naming the file; a bad JSONL line is an error naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

from .errors import MambaError


@dataclasses.dataclass
class DataFile:
    """One --data argument: its documents and what the JSON report says about the file."""

    path: str
    documents: list[str]
    sha256: str
    bytes: int


def _decode(raw: bytes, name: str) -> str:
    if b"\x00" in raw[:65536]:
        raise MambaError(f"--data {name}: looks like a binary file (NUL bytes); give UTF-8 text (.txt) or JSON lines (.jsonl)")
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        warnings.warn(f"{name} is not valid UTF-8; invalid bytes were replaced with U+FFFD")
    return text


def read_data_file(name: str, text_field: str = "text") -> DataFile:
    """Read one data file ('-' for stdin) into documents."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except FileNotFoundError:
        raise MambaError(f"--data {name}: no such file") from None
    except IsADirectoryError:
        raise MambaError(f"--data {name}: is a directory; give a .txt or .jsonl file") from None
    except OSError as exc:
        raise MambaError(f"--data {name}: cannot read ({exc.strerror})") from None
    text = _decode(raw, "stdin" if name == "-" else name)
    if name.endswith(".jsonl"):
        documents = _jsonl_documents(text, name, text_field)
    else:
        documents = [text]
    if not any(doc.strip() for doc in documents):
        raise MambaError(f"--data {name}: holds no text to evaluate")
    return DataFile(path=name, documents=documents, sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))


def _jsonl_documents(text: str, name: str, field: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MambaError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise MambaError(f"{name}:{number}: no string field '{field}' (choose the field with --text-field)")
        documents.append(row[field])
    return documents
