"""The CLI's malloc settings: a prompt's freed activations are reused without page faults (Linux, glibc)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from mamba_core.allocator import keep_freed_memory
from mamba_core.config import MambaConfig
from mamba_core.loading import build_model


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_prompts_reuse_freed_memory():
    """The 130m model's widths (2 layers): a 2048-token float32 prompt allocates projections of 6-12 MB
    per 1024-token chunk, which glibc would otherwise hand back to the kernel at every free and fault
    in again (up to ~290,000 faults per prompt for 24 layers). With the settings, once the heap has
    grown, a second prompt takes few."""
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
    config = MambaConfig(hidden_size=768, num_hidden_layers=2, state_size=16, vocab_size=1000)
    model = build_model(config, None, torch.float32, torch.device("cpu"), source="random")
    ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
    faults = []
    with torch.inference_mode():
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            model(ids, model.make_cache(1), logits_to_keep=1)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert faults[1] < 10_000, faults  # 0-2,900 here (one 12 MB block alone is 3,072 pages); without: 30,000-51,000
