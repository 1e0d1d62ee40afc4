"""CUDA-graph decoding: the one-token step captured once per batch size, then replayed.

A decode step of a small Mamba is hundreds of tiny kernels; launching them from Python costs far
more than running them. Mamba's cache is preallocated and updated in place, so the whole step
(embedding, every layer, the head) can be captured with a static token buffer and a static
logits output, and replayed for each token: one launch per token. `decoder_for` picks the step a
generation loop uses: this graph on CUDA, the compiled CPU backend's one-call step on the CPU.
"""

from __future__ import annotations

import torch

from .cache import MambaCache
from .model import MambaForCausalLM


class GraphedDecoder:
    """Replays a captured `model(tokens[:, None], cache, logits_to_keep=1)` for a fixed cache."""

    def __init__(self, model: MambaForCausalLM, cache: MambaCache):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        saved = cache.clone()  # warm-up runs advance the state: put it back afterwards
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # first calls allocate workspaces and pick kernels outside the capture
                model(self.tokens, cache, logits_to_keep=1)
        torch.cuda.current_stream(model.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache, logits_to_keep=1)  # (b, 1, vocab), static
        cache._conv.copy_(saved._conv)
        cache._ssm.copy_(saved._ssm)
        cache.seen_tokens = saved.seen_tokens

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) on the device -> logits (b, vocab) after them; the cache advances one step."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits[:, -1]


def decoder_for(model: MambaForCausalLM, cache: MambaCache):
    """The fastest one-token step for this model: tokens (b,) -> logits (b, vocab), the cache
    advanced. A CUDA graph on CUDA (unless the torch backend was asked for, to compare), the
    backend's own whole-token step where it has one (the compiled CPU kernels), else the forward."""
    if model.device.type == "cuda" and model.backend != "torch":
        return GraphedDecoder(model, cache)
    fused = getattr(model.ops, "decoder", None)
    step = fused(model, cache) if fused is not None else None
    return step or (lambda tokens: model(tokens[:, None], cache, logits_to_keep=1)[:, -1])
