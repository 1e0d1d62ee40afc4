"""The generation engine: greedy text, sampling, stop strings, EOS and padding-free batches."""

from __future__ import annotations

import pytest
import torch

from mamba_core.errors import MambaUsageError
from mamba_core.generation import Generation, generate, stream
from mamba_core.sampling import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0)


def test_greedy_fixture_text(tiny, tiny_tokenizer):
    text = "".join(r.text for r in stream(tiny.model, tiny_tokenizer, "The game was", sampling=GREEDY, max_new_tokens=12))
    assert text.startswith(" also a member of the city . \n \n = =")


def test_seed_reproducible_and_seeds_differ(tiny, tiny_tokenizer):
    def run(seed):
        return generate(tiny.model, tiny_tokenizer, ["The game was"], sampling=SamplingParams(seed=seed, temperature=1.5), max_new_tokens=30)[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_batch_rows_equal_solo_runs(tiny, tiny_tokenizer):
    prompts = ["The game was", "In 1998 , the", "A", "The game was", "= Robert Boulter =\n"]
    batch = generate(tiny.model, tiny_tokenizer, prompts, sampling=GREEDY, max_new_tokens=25)
    for prompt, result in zip(prompts, batch):
        solo = generate(tiny.model, tiny_tokenizer, [prompt], sampling=GREEDY, max_new_tokens=25)[0]
        assert result.token_ids == solo.token_ids and result.text == solo.text


def test_stop_string_cuts_text(tiny, tiny_tokenizer):
    result = generate(tiny.model, tiny_tokenizer, ["The game was"], sampling=GREEDY, max_new_tokens=30, stop=["city"])[0]
    assert result.text == " also a member of the " and result.finish_reason == "stop"


def test_eos_and_ignore_eos(tiny, tiny_tokenizer):
    # Force EOS: a prompt after which the fixture predicts <|endoftext|> is unlikely; make eos the argmax instead.
    model = tiny.model
    gen = Generation(model, tiny_tokenizer, ["The game was"], sampling=GREEDY, max_new_tokens=5)
    gen.eos = generate(model, tiny_tokenizer, ["The game was"], sampling=GREEDY, max_new_tokens=3)[0].token_ids[2]
    for _ in gen:
        pass
    assert gen.results[0].finish_reason == "eos" and len(gen.results[0].token_ids) == 2
    full = generate(model, tiny_tokenizer, ["The game was"], sampling=GREEDY, max_new_tokens=5, ignore_eos=True)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 5


def test_empty_prompt_starts_from_bos(tiny, tiny_tokenizer):
    result = generate(tiny.model, tiny_tokenizer, [""], sampling=GREEDY, max_new_tokens=4)[0]
    assert result.prompt_ids == [0] and len(result.token_ids) == 4


def test_sampler_never_picks_padding_rows_and_filters():
    sampler = Sampler(SamplingParams(seed=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), vocab_limit=5)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 100.0, 100.0, 100.0]])
    assert all(sampler(logits).item() < 5 for _ in range(50))
    top1 = Sampler(SamplingParams(seed=0, top_k=1), vocab_limit=8)
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top1(logits), logits.argmax(-1))
    nucleus = Sampler(SamplingParams(seed=0, top_k=0, top_p=0.5, min_p=0.0), vocab_limit=3)
    probs = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert all(nucleus(probs).item() == 0 for _ in range(30))  # 0.6 >= 0.5 alone
    minp = Sampler(SamplingParams(seed=0, top_k=0, top_p=1.0, min_p=0.4), vocab_limit=3)
    assert {minp(probs).item() for _ in range(60)} == {0, 1}  # 0.1 < 0.4 * 0.6 is dropped


def reference_probs(logits, p):
    """The sampler chain written over the whole vocabulary (masks, sorts): the probabilities of each id."""
    if 0 < p.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < torch.topk(logits, p.top_k, dim=-1).values[:, -1:], float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)
        logits = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= p.top_p), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return (logits / p.temperature).softmax(dim=-1)


@pytest.mark.parametrize("top_k, top_p, min_p", [(40, 0.95, 0.05), (0, 0.9, 0.0), (10, 1.0, 0.0), (0, 1.0, 0.1), (50, 0.5, 0.2), (0, 1.0, 0.0)])
def test_sampler_distribution_matches_the_whole_vocabulary_chain(top_k, top_p, min_p):
    """The sampler works on the top k candidates only (a partial sort): the probability it gives each
    id equals the chain's over the whole vocabulary, for filters alone and combined."""
    params = SamplingParams(seed=0, temperature=0.7, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(top_k + 7)) * 3
    ids, probs = Sampler(params, vocab_limit=5000).distribution(logits)
    got = torch.zeros_like(logits).scatter(-1, ids, probs)
    assert torch.allclose(got, reference_probs(logits, params), rtol=1e-5, atol=1e-7)
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_sampler_draws_follow_its_distribution():
    """The inverse-CDF pick over the candidates: 40,000 rows drawn at once, each id's frequency
    within 4.5 standard deviations of its probability; filtered ids never drawn."""
    params = SamplingParams(seed=1, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05)
    sampler = Sampler(params, vocab_limit=8)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.9, 0.2, -1.0, 3.0, -3.0]]).expand(40000, 8)
    ids, probs = sampler.distribution(logits[:1])
    want = torch.zeros(8).scatter(0, ids[0], probs[0])
    got = torch.bincount(sampler(logits), minlength=8).double() / 40000
    sd = (want * (1 - want) / 40000).sqrt()
    assert ((got - want).abs() <= 4.5 * sd + 1e-12).all() and (got[want == 0] == 0).all()


def test_repeat_penalty_changes_greedy_choice():
    sampler = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0), vocab_limit=3)
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    assert sampler(logits, [[0]]).item() == 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repeat_penalty=0)])
def test_invalid_sampling_is_usage_error(bad):
    with pytest.raises(MambaUsageError):
        SamplingParams(**bad)
