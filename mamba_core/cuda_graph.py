"""CUDA-graph decoding: the one-token step captured once per batch size, then replayed.

A decode step of a small Mamba is hundreds of tiny kernels; launching them from Python costs far
more than running them. Mamba's cache is preallocated and updated in place, so the whole step
(embedding, every layer, the head) can be captured with a static token buffer and a static
logits output, and replayed for each token: one launch per token. `decoder_for` picks the step a
generation loop uses: this graph on CUDA, the compiled CPU backend's one-call step on the CPU;
`sampling_step` also puts the sampler's draw into the graph.
"""

from __future__ import annotations

import torch

from .cache import MambaCache
from .model import MambaForCausalLM
from .sampling import Sampler


class GraphedDecoder:
    """Replays a captured `model(tokens[:, None], cache, logits_to_keep=1)` for a fixed cache, and
    with a `sampler` (no repetition penalty: it depends on the history) the draw of the next
    tokens too, from uniform numbers copied in per step (`sample`)."""

    def __init__(self, model: MambaForCausalLM, cache: MambaCache, sampler: Sampler | None = None):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=model.device)
        self.u = torch.zeros(cache.batch_size, 1, device=model.device)  # the draw's uniforms, static
        saved = cache.clone()  # warm-up runs advance the state: put it back afterwards
        stream = torch.cuda.Stream(model.device)
        stream.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # first calls allocate workspaces and pick kernels outside the capture
                self._step()
        torch.cuda.current_stream(model.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.next_tokens = self._step()  # (b, 1, vocab), (b,) or None: static
        cache._conv.copy_(saved._conv)
        cache._ssm.copy_(saved._ssm)
        cache.seen_tokens = saved.seen_tokens

    def _step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sampler is None:
            return self.model(self.tokens, self.cache, logits_to_keep=1), None
        # A greedy draw takes the model dtype's logits (the same argmax, one conversion kernel
        # fewer) and the ops layer's argmax (ours on CUDA, launched early); the draw writes the next
        # tokens into the graph's own input buffer, so that feeding them back (`sample(sample(t))`)
        # needs no copy.
        logits = self.model(self.tokens, self.cache, logits_to_keep=1, float_logits=not self.sampler.greedy)
        candidates = self.sampler.penalized(logits[:, -1], None)  # (b, vocab_limit): a view
        return logits, self.sampler.pick(candidates, self.u, out=self.tokens[:, 0], argmax=self.model.ops.argmax)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) on the device -> logits (b, vocab) after them; the cache advances one step."""
        if tokens.data_ptr() != self.tokens.data_ptr():  # else: the previous draw, already in place
            self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits[:, -1]

    def sample(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) -> the sampler's next tokens (b,) after them (the graph's input buffer: read
        it before the next call); the cache advances one step."""
        u = self.sampler.uniforms(self.u.shape[0], torch.device("cpu"))
        if u is not None:
            self.u.copy_(u)  # one small host-to-device copy
        self(tokens)
        return self.next_tokens


def decoder_for(model: MambaForCausalLM, cache: MambaCache):
    """The fastest one-token step for this model: tokens (b,) -> logits (b, vocab), the cache
    advanced. A CUDA graph on CUDA (unless the torch backend was asked for, to compare), the
    backend's own whole-token step where it has one (the compiled CPU kernels), else the forward."""
    if model.device.type == "cuda" and model.backend != "torch":
        return GraphedDecoder(model, cache)
    fused = getattr(model.ops, "decoder", None)
    step = fused(model, cache) if fused is not None else None
    return step or (lambda tokens: model(tokens[:, None], cache, logits_to_keep=1)[:, -1])


def sampling_step(model: MambaForCausalLM, cache: MambaCache, sampler: Sampler, history: list[list[int]] | None = None):
    """tokens (b,) -> the next tokens (b,) drawn by `sampler`, the cache advanced. Without a
    `history` (the repetition penalty's, which the caller keeps up to date) model and draw replay as
    one graph on CUDA; otherwise `sampler(decoder_for(...)(tokens), history)`."""
    if history is None and model.device.type == "cuda" and model.backend != "torch":
        return GraphedDecoder(model, cache, sampler).sample
    step = decoder_for(model, cache)
    return lambda tokens: sampler(step(tokens), history)
