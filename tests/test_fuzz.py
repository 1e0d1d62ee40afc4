"""Property-based and fuzz tests: lossless save/load over random configs, clean errors on random bytes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba_core.config import MambaConfig
from mamba_core.convert import write_hf
from mamba_core.errors import MambaError
from mamba_core.loading import load_model, read_state_dict
from mamba_core.model import MambaForCausalLM
from mamba_core.tokenizer import Tokenizer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

configs = st.builds(
    MambaConfig,
    vocab_size=st.integers(8, 64),
    hidden_size=st.integers(4, 40),
    state_size=st.integers(1, 8),
    num_hidden_layers=st.integers(1, 3),
    expand=st.integers(1, 3),
    conv_kernel=st.integers(2, 4),
    time_step_rank=st.one_of(st.just("auto"), st.integers(1, 8)),
    use_bias=st.booleans(),
    use_conv_bias=st.booleans(),
    residual_in_fp32=st.booleans(),
    tie_word_embeddings=st.booleans(),
)


@SETTINGS
@given(config=configs, seed=st.integers(0, 2**16))
def test_save_load_round_trip_is_lossless_and_finite(config, seed):
    torch.manual_seed(seed)
    model = MambaForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
        write_hf(Path(tmp), MambaConfig.from_dict(config.to_dict()), state, "float32", 10**9, lambda s: None)
        loaded = load_model(tmp, backend="torch").model
        again = read_state_dict(Path(tmp))
        assert all(torch.equal(again[k], state[k]) for k in state)
        ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
        logits = loaded(ids)
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, model.eval()(ids))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
config_keys = st.sampled_from(["hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel", "expand", "time_step_rank",
                               "layer_norm_epsilon", "model_type", "d_model", "n_layer", "ssm_cfg", "rms_norm", "use_bias", "eos_token_id",
                               "pad_vocab_size_multiple", "torch_dtype", "tie_word_embeddings", "hidden_act"])


@SETTINGS
@given(data=st.dictionaries(config_keys, json_values, max_size=8))
def test_random_config_dicts_give_a_config_or_a_clean_error(data):
    try:
        config = MambaConfig.from_dict(data)
    except MambaError:
        return
    assert config.hidden_size > 0 and config.num_hidden_layers > 0


@SETTINGS
@given(blob=st.binary(max_size=300))
def test_random_bytes_as_config_safetensors_and_tokenizer(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "config.json").write_bytes(blob)
        try:
            MambaConfig.from_file(path / "config.json")
        except MambaError:
            pass
        (path / "model.safetensors").write_bytes(blob)
        try:
            read_state_dict(path)
        except MambaError:
            pass
        (path / "tokenizer.json").write_bytes(blob)
        try:
            Tokenizer(path / "tokenizer.json")
        except MambaError:
            pass


@SETTINGS
@given(header=st.dictionaries(st.text(max_size=6), json_values, max_size=3))
def test_random_safetensors_headers(header):
    import struct

    with tempfile.TemporaryDirectory() as tmp:
        raw = json.dumps(header).encode()
        (Path(tmp) / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00" * 16)
        try:
            read_state_dict(Path(tmp))
        except MambaError:
            pass
