"""The cache makes any split of a sequence exact: prefill+decode, chunked prefill, batching."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mamba_core.cache import MambaCache
from mamba_core.config import MambaConfig
from mamba_core.loading import load_model
from mamba_core.model import MambaForCausalLM
from mamba_core.ops.reference import TorchOps, scan_chunk_size, sequential_scan


def _ids(batch, length, vocab=2045, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_prefill_then_decode_equals_full_forward(tiny):
    model = tiny.model
    ids = _ids(2, 40)
    full = model(ids)  # (2, 40, vocab)
    cache = model.make_cache(2)
    steps = [model(ids[:, :30], cache)]
    for t in range(30, 40):
        steps.append(model(ids[:, t : t + 1], cache))
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5
    assert cache.seen_tokens == 40


@pytest.mark.parametrize("chunks", [[1, 7, 64, 200], [300, 300, 11], [611]])
def test_chunked_prefill_equals_prefill_at_once(tiny, chunks):
    model = tiny.model
    ids = _ids(1, sum(chunks), seed=3)
    whole_cache = model.make_cache(1)
    whole = model(ids, whole_cache)
    cache, pieces, start = model.make_cache(1), [], 0
    for n in chunks:
        pieces.append(model(ids[:, start : start + n], cache))
        start += n
    assert rel_err(torch.cat(pieces, dim=1), whole) <= 1e-5
    assert rel_err(cache.ssm_states[3], whole_cache.ssm_states[3]) <= 1e-5
    assert rel_err(cache.conv_states[5], whole_cache.conv_states[5]) <= 1e-5


@pytest.mark.parametrize("length, keep", [(611, 1), (130, 5), (64, 3)])
def test_cpu_prefill_in_row_chunks_equals_prefill_at_once(tiny, length, keep):
    """A CPU prompt with a cache runs in chunks of cpu_prefill_rows rows (here 2 x 32): same logits,
    state and token count as one pass (64 tokens: one chunk exactly)."""
    model = tiny.model
    ids = _ids(2, length, seed=4)
    whole_cache, cache = model.make_cache(2), model.make_cache(2)
    whole = model(ids, whole_cache)[:, -keep:]
    passes = []
    hook = model.backbone.register_forward_hook(lambda *_: passes.append(1))
    model.cpu_prefill_rows = 64
    try:
        got = model(ids, cache, logits_to_keep=keep)
    finally:
        model.cpu_prefill_rows = 1024
        hook.remove()
    assert len(passes) == -(-length // 32)
    assert got.shape == whole.shape and rel_err(got, whole) <= 1e-5
    assert rel_err(cache.ssm_states[3], whole_cache.ssm_states[3]) <= 1e-5
    assert rel_err(cache.conv_states[5], whole_cache.conv_states[5]) <= 1e-5
    assert cache.seen_tokens == length


def test_cpu_prefill_chunks_of_16_bit_models_take_twice_the_rows():
    """cpu_prefill_rows counts float32 rows: a bf16 model takes twice as many per chunk (the same bytes)."""
    model = load_model("tiny-wikitext", dtype="bfloat16", device="cpu", backend="torch").model
    passes = []
    hook = model.backbone.register_forward_hook(lambda *_: passes.append(1))
    model.cpu_prefill_rows = 32  # 64 bf16 rows: 2 x 32 tokens per chunk
    try:
        model(_ids(2, 130, seed=5), model.make_cache(2), logits_to_keep=1)
    finally:
        hook.remove()
    assert len(passes) == -(-130 // 32)


def test_batch_equals_single(tiny):
    model = tiny.model
    ids = _ids(3, 50, seed=5)
    batched = model(ids)
    for row in range(3):
        assert rel_err(batched[row : row + 1], model(ids[row : row + 1])) <= 1e-5


def test_last_logits_only(tiny):
    ids = _ids(2, 20)
    assert rel_err(tiny.model(ids, logits_to_keep=1), tiny.model(ids)[:, -1:]) <= 1e-6


def test_cache_shapes_dtypes_and_reset(tiny):
    config = tiny.model.config
    cache = MambaCache(config, 3, dtype=torch.bfloat16)
    assert cache.conv_states[0].shape == (3, config.intermediate_size, config.conv_kernel)
    assert cache.ssm_states[0].shape == (3, config.intermediate_size, config.state_size)
    assert cache.ssm_states[0].dtype == torch.float32 and cache.conv_states[0].dtype == torch.bfloat16
    cache.ssm_states[2].fill_(1.0)
    cache.reset()
    assert cache._ssm.abs().sum() == 0


@pytest.mark.parametrize("length", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("initial_state", [False, True])
def test_scan_matches_sequential_recurrence(length, initial_state):
    g = torch.Generator().manual_seed(length)
    b, d, n = 2, 24, 5
    u, delta, z = (torch.randn(b, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    B, C = (torch.randn(b, length, n, generator=g, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 8
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64) if initial_state else torch.zeros(b, d, n, dtype=torch.float64)
    y_ref, h_ref = sequential_scan(u, delta, A, B, C, D, z, bias, h0)
    state = h0.float().clone()
    f = lambda t: t.float()  # noqa: E731
    y = TorchOps().selective_scan(f(u), f(delta), f(A), f(B), f(C), f(D), f(z), f(bias), state)
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(state, h_ref) <= 1e-5


def test_scan_chunks_are_bounded():
    assert scan_chunk_size(1, 256, 16) == 256
    assert scan_chunk_size(1, 1536, 16) * 1536 * 16 <= 1 << 21
    assert scan_chunk_size(64, 5120, 16) == 1


def test_conv_continuation_matches_whole():
    g = torch.Generator().manual_seed(0)
    ops = TorchOps()
    for kernel in (2, 3, 4):
        x = torch.randn(2, 20, 8, generator=g)
        w, bias = torch.randn(8, kernel, generator=g), torch.randn(8, generator=g)
        whole = ops.causal_conv1d(x, w, bias, None)
        state = torch.zeros(2, 8, kernel)
        parts = [ops.causal_conv1d(x[:, a:b_], w, bias, state) for a, b_ in ((0, 1), (1, 9), (9, 10), (10, 20))]
        assert rel_err(torch.cat(parts, 1), whole) <= 1e-6
        ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], bias, padding=kernel - 1, groups=8)[..., :20]
        assert rel_err(whole, torch.nn.functional.silu(ref).transpose(1, 2)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_state_and_params(dtype):
    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64)
    torch.manual_seed(0)
    model = MambaForCausalLM(config).eval()
    ref = model(_ids(1, 30, vocab=64))
    model.cast_(dtype)
    mixer = model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == dtype
    cache = model.make_cache(1)
    assert cache.ssm_states[0].dtype == torch.float32
    low = model(_ids(1, 30, vocab=64), cache)
    assert low.dtype == torch.float32
    assert 0 < rel_err(low, ref) <= 3e-2  # low precision: close, not identical
