"""Perplexity: exact (whole documents through the carried state), windows, llama.cpp's protocol.

A protocol turns documents into *units*: token rows that each start from a fresh state, scored
from a given position on. Units are produced lazily and a unit's tokens are a stream: scoring
reads each row `chunk_size` tokens at a time, carrying the conv and SSM state between chunks, so
neither the text, its tokens nor the model's memory grow with document length, and the result
does not depend on the chunk size. Units are batched by right-padding: the model is causal, so
padding after a row's end never changes that row's scores.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .documents import DataFile
from .errors import MambaUsageError
from .model import MambaForCausalLM
from .token_stream import TokenReader, Tokens, document_tokens, rows
from .tokenizer import Tokenizer


@dataclasses.dataclass
class Unit:
    """One row from a fresh state: its tokens, read once; positions >= first are scored."""

    tokens: Iterable[Tokens]
    first: int
    file: int  # which data file


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising (a random model's word perplexity overflows)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclasses.dataclass
class Stats:
    """Running sums for one file or the total; everything reported is derived from these."""

    tokens: int = 0
    nll_sum: float = 0.0
    nll_sq_sum: float = 0.0
    bytes: int = 0
    words: int = 0

    def add(self, nll: torch.Tensor, scored: Tokens) -> None:
        """Add the NLLs (k,) of the `scored` tokens, and the text they account for."""
        nll = nll.double()
        self.tokens += nll.numel()
        self.nll_sum += nll.sum().item()
        self.nll_sq_sum += nll.square().sum().item()
        self.bytes += int(scored.nbytes.sum())
        self.words += int(scored.words.sum())

    def report(self) -> dict:
        """The figures people compare: ppl (+/- as llama.cpp prints it), bits/byte, word ppl."""
        n = max(self.tokens, 1)
        mean = self.nll_sum / n
        var = max(self.nll_sq_sum / n - mean * mean, 0.0)
        stderr = math.sqrt(var / (n - 1)) if n > 1 else 0.0
        ppl = _exp(mean)
        return {
            "tokens_scored": self.tokens,
            "nll_sum": self.nll_sum,
            "nll_mean": mean,
            "ppl": ppl,
            "ppl_stderr": ppl * stderr,  # standard error of the mean NLL carried through exp
            "bytes": self.bytes,
            "words": self.words,
            "bits_per_byte": self.nll_sum / (self.bytes * math.log(2)) if self.bytes else None,
            "byte_ppl": _exp(self.nll_sum / self.bytes) if self.bytes else None,
            "word_ppl": _exp(self.nll_sum / self.words) if self.words else None,
        }


@dataclasses.dataclass
class Protocol:
    """How documents become scored units. name: exact | window | llama-cpp."""

    name: str = "exact"
    window: int = 0  # window: text tokens per window; llama-cpp: the context N
    chunks: int = 0  # llama-cpp: at most this many chunks (0: all)
    bos: bool = True  # exact/window: prefix each unit with BOS so every text token is scored

    def params(self) -> dict:
        """The protocol's parameters as the JSON report records them."""
        if self.name == "exact":
            return {"bos": self.bos}
        if self.name == "window":
            return {"window": self.window, "bos": self.bos}
        return {"ctx": self.window, "chunks": self.chunks or None, "scored_per_chunk": self.window - 1 - self.window // 2}


def make_units(protocol: Protocol, tokenizer: Tokenizer, files: list[DataFile]) -> Iterator[Unit]:
    """Cut every document into units as the protocol says, lazily, tokenizing as it goes."""
    bos = Tokens.special(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0)
    for f, data in enumerate(files):
        taken = 0
        for pieces in data.texts():
            if protocol.name == "llama-cpp":
                for row in rows(document_tokens(tokenizer, pieces, add_special_tokens=True), protocol.window):
                    if len(row) < protocol.window or (protocol.chunks and taken >= protocol.chunks):
                        break
                    if tokenizer.adds_bos:
                        row = Tokens.cat([bos, row[1:]])
                    yield Unit([row], protocol.window // 2 + 1, f)
                    taken += 1
            elif protocol.name == "window":
                for row in rows(document_tokens(tokenizer, pieces), protocol.window):
                    yield Unit([Tokens.cat([bos, row]) if protocol.bos else row], 1, f)
            else:
                tokens = document_tokens(tokenizer, pieces)
                yield Unit(itertools.chain([bos], tokens) if protocol.bos else tokens, 1, f)


def limit_units(units: Iterable[Unit], limit: int) -> Iterator[Unit]:
    """Keep units, in order, until `limit` tokens are scored, cutting the last one short.

    Each kept unit is read ahead only up to the tokens it may still score, so memory is bounded
    by the limit, not by the documents.
    """
    left = limit
    for unit in units:
        if left <= 0:
            break
        taken = TokenReader(unit.tokens).window(0, unit.first + left)
        left -= max(len(taken) - unit.first, 0)
        yield Unit([taken], unit.first, unit.file)


@dataclasses.dataclass
class KLStats:
    """KL(base || model) per scored token and top-1 agreement, for --kl-base, in constant memory.

    Mean and max are exact; the 99th percentile is exact up to RESERVOIR scored tokens and estimated
    from a uniform random sample of that many (reservoir sampling, fixed seed) beyond.
    """

    RESERVOIR = 1 << 20  # 4 MB of float32

    count: int = 0
    total: float = 0.0
    highest: float = 0.0
    agree: int = 0
    sample: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))
    generator: torch.Generator = dataclasses.field(default_factory=lambda: torch.Generator().manual_seed(0))

    def add(self, values: torch.Tensor) -> None:
        """Add per-token KL values (k,) (float32, CPU)."""
        room = self.RESERVOIR - len(self.sample)
        if room > 0:
            self.sample = torch.cat([self.sample, values[:room]])
        rest = values[max(room, 0) :]
        if len(rest):  # Algorithm R: the i-th value (0-based) replaces a random slot with probability R / (i + 1)
            seen = self.count + max(room, 0) + torch.arange(len(rest), dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (seen + 1)).long()
            keep = slots < self.RESERVOIR
            self.sample[slots[keep]] = rest[keep]
        self.count += len(values)
        self.total += values.double().sum().item()
        self.highest = max(self.highest, values.max().item()) if len(values) else self.highest

    def report(self) -> dict:
        """Mean, max, 99th percentile and top-1 agreement, as the JSON report's `kl` object."""
        sample = self.sample.double() if len(self.sample) else torch.zeros(1, dtype=torch.float64)
        return {
            "kl_mean": self.total / max(self.count, 1),
            "kl_max": self.highest,
            "kl_p99": torch.quantile(sample, 0.99).item(),
            "top1_agreement": self.agree / max(self.count, 1),
        }


@dataclasses.dataclass
class EvalResult:
    """What `evaluate` returns: per-file and total statistics, the KL against a base model if asked,
    and the time it took for how many tokens fed to the model (BOS and batch padding included)."""

    files: list[Stats]
    total: Stats
    kl: KLStats | None
    seconds: float
    tokens_processed: int


def evaluate(
    model: MambaForCausalLM,
    units: Iterable[Unit],
    n_files: int,
    chunk_size: int = 2048,
    batch_size: int = 1,
    base: MambaForCausalLM | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score every unit; per-file and total statistics (and KL against `base` if given).

    `progress` is called after each chunk with the bytes of text it consumed.
    """
    if chunk_size <= 0 or batch_size <= 0:
        raise MambaUsageError("--chunk-size and --batch-size must be positive")
    files = [Stats() for _ in range(n_files)]
    kl = KLStats() if base is not None else None
    started, processed = time.perf_counter(), 0
    units = iter(units)
    while batch := list(itertools.islice(units, batch_size)):
        processed += _score_batch(model, base, batch, chunk_size, files, kl, progress)
    total = Stats()
    for s in files:
        for field in ("tokens", "nll_sum", "nll_sq_sum", "bytes", "words"):
            setattr(total, field, getattr(total, field) + getattr(s, field))
    return EvalResult(files, total, kl, time.perf_counter() - started, processed)


def _score_batch(model, base, batch: list[Unit], chunk_size: int, files: list[Stats], kl: KLStats | None, progress) -> int:
    """Feed one batch of units chunk by chunk; add each row's scored NLLs to its file's stats."""
    readers = [TokenReader(u.tokens) for u in batch]
    caches = [m.make_cache(len(batch)) if m is not None else None for m in (model, base)]
    processed = 0
    for start in itertools.count(0, chunk_size):
        pieces = [r.window(start, start + chunk_size + 1) for r in readers]  # inputs and the next targets
        width = max(len(p) for p in pieces)  # c + 1
        if width <= 1:
            break
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (b, c + 1), right-padded with 0 (never scored)
        for row, piece in enumerate(pieces):
            ids[row, : len(piece)] = piece.ids
        ids = ids.to(model.device)
        logits = model(ids[:, :-1], caches[0])  # (b, c, vocab) float32
        # (b, c); over rows of (b c, vocab): the softmax along contiguous memory, 5-6x faster on a CPU
        # than over the transposed (b, vocab, c) view (38% of the fixture's evaluation time)
        nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(logits.shape[:2])
        base_logits = base(ids[:, :-1], caches[1]) if base is not None else None
        for row, (unit, piece) in enumerate(zip(batch, pieces)):
            lo, hi = max(unit.first - start - 1, 0), len(piece) - 1  # targets start + 1 + [lo, hi) are scored
            if hi > lo:
                files[unit.file].add(nll[row, lo:hi], piece[lo + 1 : hi + 1])
                if kl is not None:
                    _add_kl(kl, logits[row, lo:hi], base_logits[row, lo:hi])
        processed += len(batch) * (width - 1)
        if progress is not None:
            progress(sum(int(p.nbytes[1:].sum()) for p in pieces))
    return processed


def _add_kl(kl: KLStats, logits: torch.Tensor, base_logits: torch.Tensor) -> None:
    """KL(base || model) for each position: sum p_base (log p_base - log p_model)."""
    vocab = min(logits.shape[-1], base_logits.shape[-1])
    log_p = logits[:, :vocab].log_softmax(-1)
    log_q = base_logits[:, :vocab].log_softmax(-1)
    kl.add((log_q.exp() * (log_q - log_p)).sum(-1).clamp_min(0).float().cpu())
    kl.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
