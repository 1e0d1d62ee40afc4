"""Choosing the next token from logits: penalties, top-k, top-p, min-p, temperature.

The order is llama.cpp's sampler chain (its defaults are ours too): repetition penalty over the
last `repeat_last_n` tokens, then top-k, top-p and min-p on the untempered distribution, then
temperature, then the draw: an inverse-CDF pick with one number per row from a seeded CPU
`torch.Generator` (reproducible for a given seed, and the same on every device).
Temperature 0 is greedy (argmax). Ids at or above the tokenizer's vocabulary size (embedding
padding rows) are never chosen.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from .errors import MambaUsageError


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens. Defaults are llama.cpp's; temperature 0 means greedy."""

    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables
    repeat_last_n: int = 64
    seed: int | None = None  # None: a random seed, reported back in `seed_used`

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MambaUsageError(f"--temp must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise MambaUsageError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MambaUsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise MambaUsageError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise MambaUsageError(f"--repeat-penalty must be > 0 (1 disables it), got {self.repeat_penalty}")
        self.seed_used = self.seed if self.seed is not None else random.randrange(2**31)


class Sampler:
    """Stateful sampler for one generation: owns the random generator and the vocabulary limit.

    The chain is tensor operations only, given one uniform number per row drawn from a seeded CPU
    generator (`uniforms`) and an inverse-CDF pick: so a CUDA graph can capture it with the model's
    step (`cuda_graph.sampling_step`: ~10 small GPU launches per token cost an H200 decode more than
    the model itself), and a seed gives the same draws on every device.
    """

    def __init__(self, params: SamplingParams, vocab_limit: int):
        self.params = params
        self.vocab_limit = vocab_limit
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed_used)

    @property
    def greedy(self) -> bool:
        """Temperature 0: the argmax, no random numbers (the logits' dtype does not change it)."""
        return self.params.temperature == 0

    def __call__(self, logits: torch.Tensor, history: list[list[int]] | None = None) -> torch.Tensor:
        """logits (b, vocab) float32 -> next ids (b,). `history`: each row's ids so far."""
        logits = self.penalized(logits, history)
        return self.pick(logits, self.uniforms(logits.shape[0], logits.device))

    def uniforms(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """The next draw's random numbers, (rows, 1) in [0, 1) on `device`; None when greedy."""
        if self.greedy:
            return None
        return torch.rand(rows, 1, generator=self.generator).to(device)

    def pick(self, logits: torch.Tensor, u: torch.Tensor | None, out: torch.Tensor | None = None, argmax=None) -> torch.Tensor:
        """ids (b,) for logits (b, vocab) after the penalty: argmax when greedy, else the candidate
        where the cumulative probability passes u (inverse-CDF sampling from `distribution`).
        `out`: a (b,) tensor to write them into (a CUDA graph's own input buffer), returned.
        `argmax`: the ops layer's `argmax(x, out)` to use (the CUDA backend's; torch's by default)."""
        if self.greedy:
            return argmax(logits, out) if argmax is not None else torch.argmax(logits, dim=-1, out=out)
        ids, probs = self.distribution(logits)
        cdf = probs.cumsum(dim=-1)  # (b, k)
        choice = (cdf < u * cdf[:, -1:]).sum(dim=-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
        if out is None:
            return ids.gather(-1, choice)[:, 0]
        torch.gather(ids, -1, choice, out=out[:, None])
        return out

    def penalized(self, logits: torch.Tensor, history: list[list[int]] | None) -> torch.Tensor:
        """logits (b, vocab) cut to the vocabulary (a view), or a copy with the repetition penalty applied."""
        p = self.params
        logits = logits[:, : self.vocab_limit]
        if p.repeat_penalty != 1.0 and history:
            logits = logits.clone()  # only then: the penalty writes in place, the rest of the chain does not
            for row, ids in enumerate(history):
                recent = torch.tensor(sorted(set(ids[-p.repeat_last_n :])), dtype=torch.long, device=logits.device)
                recent = recent[recent < self.vocab_limit]
                values = logits[row, recent]
                logits[row, recent] = torch.where(values > 0, values / p.repeat_penalty, values * p.repeat_penalty)
        return logits

    def distribution(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the draw picks from: (ids, probs), each (b, k), candidates by descending logit.

        The top k first (exactly k, as llama.cpp cuts them; one partial sort instead of sorting the
        whole vocabulary, which cost ~5-10 ms per token on a CPU), then top-p (a candidate stays while
        the mass before it is below p) and min-p (those at least min_p times the likeliest) on the
        untempered distribution of the k, then temperature. Filtered candidates get probability 0.
        """
        p = self.params
        k = p.top_k if 0 < p.top_k < logits.shape[-1] else logits.shape[-1]
        values, ids = torch.topk(logits, k, dim=-1)  # (b, k), descending
        probs = values.softmax(dim=-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            keep &= probs.cumsum(dim=-1) - probs < p.top_p
        if p.min_p > 0.0:
            keep &= probs >= p.min_p * probs[:, :1]
        return ids, (values.masked_fill(~keep, float("-inf")) / p.temperature).softmax(dim=-1)
