"""Perplexity: exact (whole documents through the carried state), windows, llama.cpp's protocol.

A protocol turns documents into *units*: token rows that each start from a fresh state, with the
range of positions whose tokens are scored. Scoring feeds the units in chunks of `chunk_size`
tokens, carrying the conv and SSM state between chunks, so memory does not grow with document
length and the result does not depend on the chunk size. Units are batched by right-padding:
the model is causal, so padding after a row's end never changes that row's scores.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import MambaUsageError
from .model import MambaForCausalLM
from .tokenizer import Tokenizer


@dataclasses.dataclass
class Unit:
    """One row from a fresh state: ids[t] is scored for t in [first, end) (from logits at t - 1)."""

    ids: torch.Tensor  # (l,) int32
    first: int
    end: int
    file: int  # which data file
    doc: int  # which document of that file
    spans: torch.Tensor  # (l, 2) character span of each token in the document ((0, 0) for BOS)


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

    def add(self, nll: torch.Tensor) -> None:
        nll = nll.double()
        self.tokens += nll.numel()
        self.nll_sum += nll.sum().item()
        self.nll_sq_sum += nll.square().sum().item()

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
        if self.name == "exact":
            return {"bos": self.bos}
        if self.name == "window":
            return {"window": self.window, "bos": self.bos}
        return {"ctx": self.window, "chunks": self.chunks or None, "scored_per_chunk": self.window - 1 - self.window // 2}


def make_units(protocol: Protocol, tokenizer: Tokenizer, files: list[list[str]]) -> list[Unit]:
    """Tokenize every document and cut it into units as the protocol says."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    bos_id, bos_span = torch.tensor([bos], dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    units: list[Unit] = []
    for f, documents in enumerate(files):
        taken = 0
        for d, text in enumerate(documents):
            if protocol.name == "llama-cpp":
                ids, spans = tokenizer.encode_document(text, add_special_tokens=True)
                n = protocol.window
                for start in range(0, len(ids) - n + 1, n):
                    if protocol.chunks and taken >= protocol.chunks:
                        break
                    row = ids[start : start + n].clone()
                    if tokenizer.adds_bos:
                        row[0] = bos
                    units.append(Unit(row, n // 2 + 1, n, f, d, spans[start : start + n]))
                    taken += 1
                continue
            ids, spans = tokenizer.encode_document(text)
            step = protocol.window if protocol.name == "window" else max(len(ids), 1)
            for start in range(0, len(ids), step):
                row, row_spans = ids[start : start + step], spans[start : start + step]
                if protocol.bos:
                    row, row_spans = torch.cat([bos_id, row]), torch.cat([bos_span, row_spans])
                if len(row) > 1:
                    units.append(Unit(row, 1, len(row), f, d, row_spans))
    return units


def limit_units(units: list[Unit], limit: int) -> list[Unit]:
    """Keep units until `limit` tokens are scored, cutting the last one short."""
    kept, total = [], 0
    for unit in units:
        if total >= limit:
            break
        take = min(unit.end - unit.first, limit - total)
        unit.end = unit.first + take
        unit.ids = unit.ids[: unit.end]
        kept.append(unit)
        total += take
    return kept


def count_text(units: list[Unit], files: list[list[str]], totals: list[Stats]) -> None:
    """Bytes and words of the text the scored tokens cover, per file (spans merged per document)."""
    covered: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for u in units:
        spans = u.spans[u.first : u.end]
        spans = spans[spans[:, 1] > spans[:, 0]]
        if len(spans):
            covered.setdefault((u.file, u.doc), []).append((int(spans[0, 0]), int(spans[-1, 1])))
    for (f, d), spans in covered.items():
        spans.sort()
        merged = [list(spans[0])]
        for start, end in spans[1:]:
            if start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            nbytes, nwords = text_size(files[f][d], start, end)
            totals[f].bytes += nbytes
            totals[f].words += nwords


_WORD = re.compile(r"\S+")


def text_size(text: str, start: int = 0, end: int | None = None, block: int = 1 << 20) -> tuple[int, int]:
    """UTF-8 bytes and whitespace-separated words of text[start:end], in constant extra memory."""
    end = len(text) if end is None else end
    nbytes = sum(len(text[i : min(i + block, end)].encode("utf-8")) for i in range(start, end, block))
    nwords = sum(1 for _ in _WORD.finditer(text, start, end))
    return nbytes, nwords


@dataclasses.dataclass
class KLStats:
    """KL(base || model) per scored token and top-1 agreement, for --kl-base."""

    values: list[torch.Tensor] = dataclasses.field(default_factory=list)
    agree: int = 0

    def report(self) -> dict:
        kl = torch.cat(self.values).double() if self.values else torch.zeros(1, dtype=torch.float64)
        return {
            "kl_mean": kl.mean().item(),
            "kl_max": kl.max().item(),
            "kl_p99": torch.quantile(kl[: 1 << 24], 0.99).item(),
            "top1_agreement": self.agree / max(kl.numel(), 1),
        }


@dataclasses.dataclass
class EvalResult:
    files: list[Stats]
    total: Stats
    kl: KLStats | None
    seconds: float
    tokens_processed: int


def evaluate(
    model: MambaForCausalLM,
    units: list[Unit],
    n_files: int,
    chunk_size: int = 2048,
    batch_size: int = 1,
    base: MambaForCausalLM | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score every unit; per-file and total statistics (and KL against `base` if given)."""
    if chunk_size <= 0 or batch_size <= 0:
        raise MambaUsageError("--chunk-size and --batch-size must be positive")
    files = [Stats() for _ in range(n_files)]
    kl = KLStats() if base is not None else None
    started, processed = time.perf_counter(), 0
    for i in range(0, len(units), batch_size):
        batch = units[i : i + batch_size]
        processed += _score_batch(model, base, batch, chunk_size, files, kl, progress)
    total = Stats()
    for s in files:
        total.tokens += s.tokens
        total.nll_sum += s.nll_sum
        total.nll_sq_sum += s.nll_sq_sum
    return EvalResult(files, total, kl, time.perf_counter() - started, processed)


def _score_batch(model, base, batch: list[Unit], chunk_size: int, files: list[Stats], kl: KLStats | None, progress) -> int:
    """Feed one batch of units chunk by chunk; add each row's scored NLLs to its file's stats."""
    length = max(len(u.ids) for u in batch)
    caches = [m.make_cache(len(batch)) if m is not None else None for m in (model, base)]
    for start in range(0, length - 1, chunk_size):
        end = min(start + chunk_size, length - 1)  # inputs [start, end) predict ids [start+1, end+1)
        ids = torch.zeros(len(batch), end + 1 - start, dtype=torch.long)  # this chunk only: (b, c + 1)
        for row, unit in enumerate(batch):
            piece = unit.ids[start : end + 1]  # right-padded with 0 past a row's end (never scored)
            ids[row, : len(piece)] = piece
        ids = ids.to(model.device)
        logits = model(ids[:, :-1], caches[0])  # (b, c, vocab) float32
        targets = ids[:, 1:]  # (b, c)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (b, c)
        base_logits = base(ids[:, :-1], caches[1]) if base is not None else None
        for row, unit in enumerate(batch):
            lo, hi = max(unit.first, start + 1) - start - 1, min(unit.end, end + 1) - start - 1
            if hi <= lo:
                continue
            files[unit.file].add(nll[row, lo:hi])
            if kl is not None:
                _add_kl(kl, logits[row, lo:hi], base_logits[row, lo:hi])
        if progress is not None:
            progress(len(batch) * (end - start))
    return len(batch) * (length - 1)


def _add_kl(kl: KLStats, logits: torch.Tensor, base_logits: torch.Tensor) -> None:
    """KL(base || model) for each position: sum p_base (log p_base - log p_model)."""
    vocab = min(logits.shape[-1], base_logits.shape[-1])
    log_p = logits[:, :vocab].log_softmax(-1)
    log_q = base_logits[:, :vocab].log_softmax(-1)
    kl.values.append((log_q.exp() * (log_q - log_p)).sum(-1).clamp_min(0).cpu())
    kl.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
