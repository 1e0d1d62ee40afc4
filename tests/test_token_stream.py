"""Streamed tokenization: the same ids as one encode, and text accounting that adds up exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import NEOX_TOKENIZER, WIKITEXT
from mamba_core.documents import DataFile
from mamba_core.token_stream import TokenReader, Tokens, document_tokens, rows
from mamba_core.tokenizer import Tokenizer

TEXT = WIKITEXT.read_text(encoding="utf-8")


def pieces_of(text: str, size: int):
    return (text[i : i + size] for i in range(0, len(text), size))


@pytest.mark.parametrize("which", ["fixture", "neox"])
def test_blockwise_stream_equals_one_encode_and_accounts_every_byte_and_word(tiny_tokenizer, which):
    tokenizer = tiny_tokenizer if which == "fixture" else Tokenizer(NEOX_TOKENIZER, 0, 0)
    text = TEXT[:400_000] + " caf\u00e9 \u65e5\u672c\u8a9e\u00a0word\u3000end \U0001f600x \n"  # multi-byte, odd spaces
    streamed = Tokens.cat(list(document_tokens(tokenizer, pieces_of(text, 7919))))
    assert len(list(tokenizer.encode_stream(pieces_of(text, 7919)))) > 5  # really cut into blocks
    assert streamed.ids.tolist() == tokenizer.encode(text, add_special_tokens=False)
    assert int(streamed.nbytes.sum()) == len(text.encode("utf-8"))
    assert int(streamed.words.sum()) == len(text.split())
    assert (streamed.nbytes >= 0).all() and (streamed.words >= 0).all()


def test_rows_and_reader_cover_a_stream_exactly():
    runs = [Tokens(torch.arange(a, b, dtype=torch.int32), torch.ones(b - a, dtype=torch.int32), torch.zeros(b - a, dtype=torch.int32))
            for a, b in [(0, 3), (3, 4), (4, 20), (20, 21)]]
    assert [r.ids.tolist() for r in rows(runs, 6)] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18)), [18, 19, 20]]
    reader = TokenReader(iter(runs))
    assert reader.window(0, 5).ids.tolist() == [0, 1, 2, 3, 4]
    assert reader.window(4, 9).ids.tolist() == [4, 5, 6, 7, 8]
    assert reader.window(19, 30).ids.tolist() == [19, 20]
    assert len(reader.window(21, 30)) == 0


def test_data_file_is_streamed_and_counted(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(TEXT.encode("utf-8") + b"tail \xff bytes")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        data = DataFile(str(path))
    pieces = list(next(data.texts()))
    assert len(pieces) > 1 and "".join(pieces) == (TEXT + "tail \ufffd bytes")
    assert data.words == len((TEXT + "tail \ufffd bytes").split()) and data.bytes == path.stat().st_size
