"""The generation engine: prefill, then one token at a time from the cache, as a stream.

    for r in stream(model, tokenizer, "The game was", max_new_tokens=40):
        print(r.text, end="")

Batches of prompts of any mix of lengths need no padding: prompts of equal length are prefilled
together, each group's final states are copied into the rows of one batch cache, and decoding
runs on the whole batch. Each row therefore sees exactly the computation it would see alone.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from .cuda_graph import sampling_step
from .errors import MambaUsageError
from .model import MambaForCausalLM
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

PREFILL_CHUNK = 2048  # prompt tokens per forward; bounds activation memory for long prompts


@dataclasses.dataclass
class GenerationResponse:
    """One step of one row: the text it completed (maybe empty) and, at the end, why it stopped."""

    index: int  # the prompt's position in the batch
    token: int | None  # the sampled id (None on a final flush)
    text: str
    finish_reason: str | None = None  # "eos", "stop" or "length" on the row's last response


@dataclasses.dataclass
class GenerationResult:
    """Everything one prompt produced."""

    prompt_ids: list[int]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclasses.dataclass
class Timings:
    """Wall-clock split of a generation (seconds) and token counts, for -v and --json."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def as_dict(self) -> dict:
        """The fields plus prefill and decode rates, for `--json` and `-v`."""
        d = dataclasses.asdict(self)
        d["prefill_tokens_per_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else None
        d["decode_tokens_per_s"] = self.generated_tokens / self.decode_s if self.decode_s else None
        return d


class _RowText:
    """Turns one row's ids into emitted text: UTF-8-safe, and never past a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Text safe to emit after `token`, and whether a stop string was reached."""
        return self._emit(self.decoder.push(token), final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character or a possible stop string) at the end."""
        return self._emit(self.decoder.flush(), final=True)[0]

    def _emit(self, piece: str, final: bool) -> tuple[str, bool]:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0 if final else max((_overlap(self.pending, s) for s in self.stop), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Generation:
    """A (batched) generation. Iterate it for streamed responses; `results`/`timings` after."""

    def __init__(
        self,
        model: MambaForCausalLM,
        tokenizer: Tokenizer,
        prompts: list[str | list[int]],
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 128,
        stop: tuple[str, ...] | list[str] = (),
        ignore_eos: bool = False,
    ):
        if max_new_tokens < 0:
            raise MambaUsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        if not prompts:
            raise MambaUsageError("no prompts to generate from")
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling or SamplingParams()
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eos = None if ignore_eos else tokenizer.eos_token_id
        self.results = [GenerationResult(prompt_ids=self._ids(p)) for p in prompts]
        self.timings = Timings(prompt_tokens=sum(len(r.prompt_ids) for r in self.results))

    def _ids(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:  # an empty prompt starts from BOS (else EOS), as the models were trained
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else 0]
        limit = self.model.config.vocab_size
        if max(ids) >= limit or min(ids) < 0:
            raise MambaUsageError(f"prompt token id {max(ids)} is outside the model's vocabulary (0..{limit - 1})")
        return ids

    def _prefill(self, cache) -> torch.Tensor:
        """Run every prompt into its cache rows; returns the last-position logits (b, vocab)."""
        device = self.model.device
        last = torch.empty(len(self.results), self.model.config.vocab_size, device=device)
        groups: dict[int, list[int]] = {}
        for row, result in enumerate(self.results):
            groups.setdefault(len(result.prompt_ids), []).append(row)
        for rows in groups.values():
            ids = torch.tensor([self.results[r].prompt_ids for r in rows], device=device)  # (g, l)
            sub = cache if len(rows) == len(self.results) else self.model.make_cache(len(rows))
            for start in range(0, ids.shape[1], PREFILL_CHUNK):
                logits = self.model(ids[:, start : start + PREFILL_CHUNK], sub, logits_to_keep=1)
            if sub is not cache:
                cache.copy_rows_(rows, sub)
            last[rows] = logits[:, -1]
        return last

    def __iter__(self) -> Iterator[GenerationResponse]:
        model, results = self.model, self.results
        sampler = Sampler(self.sampling, min(self.tokenizer.vocab_size, model.config.vocab_size))
        texts = [_RowText(self.tokenizer, self.stop) for _ in results]
        active = [True] * len(results)
        if self.max_new_tokens == 0:
            for row, result in enumerate(results):
                result.finish_reason = "length"
                yield GenerationResponse(row, None, "", "length")
            return
        started = time.perf_counter()
        cache = model.make_cache(len(results))
        logits = self._prefill(cache)
        history = [list(r.prompt_ids) for r in results] if self.sampling.repeat_penalty != 1.0 else None
        advance = sampling_step(model, cache, sampler, history)  # one CUDA graph with the draw on GPUs, without a history
        tokens = sampler(logits, history)
        self.timings.prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for index in range(self.max_new_tokens):
            ids = tokens.tolist()  # the one host sync per step: the ids we must print
            for row, token in enumerate(ids):
                if not active[row]:
                    continue
                yield from self._advance(row, token, texts[row], index, active)
            if not any(active):
                break
            if history is not None:
                for row, token in enumerate(ids):
                    history[row].append(token)
            tokens = advance(tokens)
        self.timings.decode_s = time.perf_counter() - started
        self.timings.generated_tokens = sum(len(r.token_ids) for r in results)

    def _advance(self, row: int, token: int, text: _RowText, step: int, active: list[bool]) -> Iterator[GenerationResponse]:
        """Record one sampled token for a row and yield what it adds; close the row when done."""
        result = self.results[row]
        if token == self.eos:
            reason = "eos"
            piece, stopped = text.flush(), False
        else:
            result.token_ids.append(token)
            piece, stopped = text.push(token)
            reason = "stop" if stopped else ("length" if step + 1 == self.max_new_tokens else None)
            if reason == "length":
                piece += text.flush()
        result.text += piece
        if reason:
            active[row] = False
            result.finish_reason = reason
        yield GenerationResponse(row, token, piece, reason)


def stream(model: MambaForCausalLM, tokenizer: Tokenizer, prompt: str | list[int], **kwargs) -> Iterator[GenerationResponse]:
    """Stream one prompt's continuation; kwargs as `Generation` (sampling, max_new_tokens, stop, ...)."""
    return iter(Generation(model, tokenizer, [prompt], **kwargs))


def generate(model: MambaForCausalLM, tokenizer: Tokenizer, prompts: list[str | list[int]], **kwargs) -> list[GenerationResult]:
    """Generate for a batch of prompts at once; results in input order."""
    gen = Generation(model, tokenizer, prompts, **kwargs)
    for _ in gen:
        pass
    return gen.results


def generate_ids(model: MambaForCausalLM, input_ids: torch.Tensor, max_new_tokens: int = 20, temperature: float = 0.0, eos_token_id: int | None = None, **sampling) -> torch.Tensor:
    """Token-level generation without a tokenizer (greedy by default, like transformers).

    input_ids (b, l) -> (b, l + max_new_tokens); rows that reach eos_token_id are padded with it.
    """
    params = SamplingParams(temperature=temperature, **sampling)
    sampler = Sampler(params, model.config.vocab_size)
    cache = model.make_cache(input_ids.shape[0])
    logits = model(input_ids.to(model.device), cache, logits_to_keep=1)[:, -1]
    out = [input_ids.to(model.device)]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=model.device)
    for _ in range(max_new_tokens):
        tokens = sampler(logits)
        if eos_token_id is not None:
            tokens = torch.where(done, torch.full_like(tokens, eos_token_id), tokens)
            done |= tokens == eos_token_id
        out.append(tokens[:, None])
        if eos_token_id is not None and bool(done.all()):
            break
        logits = model(tokens[:, None], cache, logits_to_keep=1)[:, -1]
    return torch.cat(out, dim=1)
