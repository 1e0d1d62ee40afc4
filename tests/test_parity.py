"""Numerical parity with transformers' MambaForCausalLM (float32), the reference implementation."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mamba_core.config import MambaConfig
from mamba_core.loading import build_model

transformers = pytest.importorskip("transformers")


def test_fixture_logits_match_transformers(tiny, reference):
    ids = torch.randint(0, 2045, (2, 257), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = tiny.model(ids)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_fixture_greedy_40_tokens_match_transformers(tiny, reference, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The game was")
    ids = torch.tensor([prompt])
    with torch.no_grad():  # reference greedy: full forward each step, no cache involved
        ref = ids
        for _ in range(40):
            ref = torch.cat([ref, reference(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = tiny.model.generate(ids, max_new_tokens=40)
    assert ours.tolist() == ref.tolist()
    assert tiny_tokenizer.decode(ours[0, len(prompt):].tolist()).startswith(" also a member of the city . \n \n = =")


CONFIGS = [
    dict(hidden_size=37, num_hidden_layers=2, state_size=5, conv_kernel=2, expand=2, vocab_size=101),
    dict(hidden_size=48, num_hidden_layers=3, state_size=16, conv_kernel=3, time_step_rank=7, use_bias=True, vocab_size=64),
    dict(hidden_size=64, num_hidden_layers=2, state_size=8, conv_kernel=4, use_conv_bias=False, tie_word_embeddings=False, vocab_size=90),
    dict(hidden_size=33, num_hidden_layers=1, state_size=3, conv_kernel=4, expand=3, residual_in_fp32=False, vocab_size=50),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: f"h{k['hidden_size']}-k{k['conv_kernel']}")
def test_random_configs_match_transformers(kwargs):
    torch.manual_seed(0)
    ref = transformers.MambaForCausalLM(transformers.MambaConfig(**kwargs)).eval()
    with torch.no_grad():  # make every parameter matter: non-trivial A, D, biases
        for name, p in ref.named_parameters():
            if name.endswith(("A_log", "D", "bias", "norm.weight", "norm_f.weight")):
                p.add_(torch.randn_like(p) * 0.3)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ours = build_model(MambaConfig(**kwargs), state, torch.float32, torch.device("cpu"), source="random")
    ids = torch.randint(0, kwargs["vocab_size"], (3, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    assert rel_err(ours(ids), expected) <= 1e-5
