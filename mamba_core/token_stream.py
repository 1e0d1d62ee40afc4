"""Documents as streams of tokens that know how much text they stand for.

Evaluation reports bits per byte and word perplexity, so each token carries the UTF-8 bytes and
the number of words it accounts for: a token accounts for the text from the end of the previous
token to its own end (the last token of a document also for any text after it), and a word is
counted at its first character. These counts add up over any set of tokens, so a document can be
scored block by block and windows can be scored in any order with no text kept around.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import torch

from .tokenizer import Tokenizer

# Every character for which str.isspace() holds (what str.split() and the regex \s split on).
_SPACES = torch.tensor([c for c in range(0x3001) if chr(c).isspace()], dtype=torch.int32)


@dataclasses.dataclass
class Tokens:
    """A run of one document's tokens: ids with the bytes and words of text each accounts for."""

    ids: torch.Tensor  # (n,) int32
    nbytes: torch.Tensor  # (n,) int32
    words: torch.Tensor  # (n,) int32

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: slice) -> "Tokens":
        return Tokens(self.ids[index], self.nbytes[index], self.words[index])

    @staticmethod
    def cat(runs: list["Tokens"]) -> "Tokens":
        """The runs one after the other."""
        return Tokens(*(torch.cat([getattr(r, f) for r in runs]) for f in ("ids", "nbytes", "words")))

    @staticmethod
    def empty() -> "Tokens":
        """No tokens."""
        none = torch.zeros(0, dtype=torch.int32)
        return Tokens(none, none, none)

    @staticmethod
    def special(token_id: int) -> "Tokens":
        """One token that stands for no text (the BOS a unit starts with)."""
        zero = torch.zeros(1, dtype=torch.int32)
        return Tokens(torch.tensor([token_id], dtype=torch.int32), zero, zero)


def document_tokens(tokenizer: Tokenizer, pieces: Iterable[str], add_special_tokens: bool = False) -> Iterator[Tokens]:
    """Tokenize one document given as pieces of text; yield its tokens block by block."""
    after_space, carry = True, (0, 0)  # text after the previous block's last token end
    blocks = tokenizer.encode_stream(pieces, add_special_tokens)
    block = next(blocks)
    while block is not None:
        following = next(blocks, None)
        text, ids, offsets = block
        cps = torch.frombuffer(bytearray(text.encode("utf-32-le", "surrogatepass")), dtype=torch.int32)  # (chars,)
        utf8 = 1 + (cps >= 0x80).int() + (cps >= 0x800).int() + (cps >= 0x10000).int()  # (chars,)
        space = torch.isin(cps, _SPACES)
        starts = ~space & torch.cat([torch.tensor([after_space]), space[:-1]])  # (chars,) first characters of words
        cum_bytes = torch.cat([torch.zeros(1, dtype=torch.long), utf8.cumsum(0)])  # (chars + 1,)
        cum_words = torch.cat([torch.zeros(1, dtype=torch.long), starts.cumsum(0)])  # (chars + 1,)
        ends = torch.tensor([end for _, end in offsets], dtype=torch.long).reshape(-1)  # (n,)
        if len(ends):
            ends = ends.cummax(0).values
            if following is None:
                ends[-1] = len(text)  # the last token of the document also accounts for the text after it
            nbytes, words = cum_bytes[ends].diff(prepend=cum_bytes[:1]), cum_words[ends].diff(prepend=cum_words[:1])
            nbytes[0] += carry[0]
            words[0] += carry[1]
            carry = (int(cum_bytes[-1] - cum_bytes[ends[-1]]), int(cum_words[-1] - cum_words[ends[-1]]))
            yield Tokens(torch.tensor(ids, dtype=torch.int32), nbytes.int(), words.int())
        else:
            carry = (carry[0] + int(cum_bytes[-1]), carry[1] + int(cum_words[-1]))
        after_space = bool(space[-1]) if len(text) else after_space
        block = following


def rows(stream: Iterable[Tokens], n: int) -> Iterator[Tokens]:
    """Consecutive runs of exactly n tokens from a stream (the last one may be shorter)."""
    pending: list[Tokens] = []
    size = 0
    for run in stream:
        pending.append(run)
        size += len(run)
        if size >= n:
            joined = Tokens.cat(pending)
            full = len(joined) // n * n
            yield from (joined[i : i + n] for i in range(0, full, n))
            pending, size = [joined[full:]], len(joined) - full
    if size:
        yield Tokens.cat(pending)


class TokenReader:
    """Reads a stream of Tokens by increasing position windows, keeping only what is still needed."""

    def __init__(self, stream: Iterable[Tokens]):
        self._stream = iter(stream)
        self._buffer = Tokens.empty()
        self._offset = 0  # the position of _buffer's first token

    def window(self, start: int, end: int) -> Tokens:
        """Tokens at positions [start, end) (fewer at the end of the stream); start never decreases."""
        self._buffer = self._buffer[start - self._offset :]
        self._offset = start
        pending = [self._buffer]
        size = len(self._buffer)
        while size < end - start:
            run = next(self._stream, None)
            if run is None:
                break
            pending.append(run)
            size += len(run)
        if len(pending) > 1:
            self._buffer = Tokens.cat(pending)
        return self._buffer[: end - start]
