"""Loading: both layouts, sharded safetensors, the hub cache offline, configs and tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import HF_DIR, NEOX_TOKENIZER, ORIG_DIR, run_cli
from mamba_core.config import MambaConfig
from mamba_core.errors import MambaError
from mamba_core.loading import load_model, read_state_dict
from mamba_core.tokenizer import Tokenizer

IDS = torch.randint(0, 2045, (1, 64), generator=torch.Generator().manual_seed(0))


def test_original_layout_gives_the_same_logits(tiny):
    orig = load_model(str(ORIG_DIR), dtype="float32", device="cpu", backend="torch")
    assert orig.layout == "original" and orig.model.config.vocab_size == 2048  # 2045 padded to 8
    assert torch.equal(orig.model(IDS), tiny.model(IDS))


def test_sharded_safetensors(tmp_path, tiny):
    state = read_state_dict(HF_DIR)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(HF_DIR / "config.json", tmp_path)
    shutil.copy(HF_DIR / "tokenizer.json", tmp_path)
    assert torch.equal(load_model(str(tmp_path), device="cpu", backend="torch").model(IDS), tiny.model(IDS))


def _fake_hub_cache(root, repo="state-spaces/tiny-wikitext-hf", commit="0123456789abcdef0123456789abcdef01234567"):
    """A hub cache laid out as huggingface_hub lays it out (refs/, snapshots/<commit>/)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        shutil.copy(HF_DIR / name, snapshot / name)
    return repo


def test_hub_id_from_local_cache_offline(tmp_path):
    repo = _fake_hub_cache(tmp_path / "hub")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = run_cli("generate", "-m", repo, "--temp", "0", "-n", "8", "The game was", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith(" also a member of the city")
    missing = run_cli("generate", "-m", "state-spaces/not-cached", "-n", "1", "x", env=env)
    assert missing.returncode == 1
    message = missing.stderr.decode()
    assert "state-spaces/not-cached" in message and "main" in message and str(tmp_path / "hub") in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1


def test_neox_tokenizer():
    tok = Tokenizer(NEOX_TOKENIZER, bos_token_id=0, eos_token_id=0)
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.encode(" Hello world") == [24387, 1533]
    assert tok.vocab_size == 50277 and not tok.adds_bos


def test_streaming_decoder_is_utf8_safe():
    tok = Tokenizer(NEOX_TOKENIZER)
    text = "naïve café — 日本語のテキスト 🙂 done"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_config_both_layouts_and_refusals():
    hf = MambaConfig.from_file(HF_DIR / "config.json")
    orig = MambaConfig.from_file(ORIG_DIR / "config.json")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "state_size", "conv_kernel", "time_step_rank", "intermediate_size"):
        assert getattr(hf, key) == getattr(orig, key), key
    assert MambaConfig.from_dict({"hidden_size": 768, "num_hidden_layers": 2, "new_key": 1}).time_step_rank == 48
    assert MambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 2, "dtype": "bfloat16"}).torch_dtype == "bfloat16"
    with pytest.raises(MambaError, match="model_type 'llama'"):
        MambaConfig.from_dict({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2})
    with pytest.raises(MambaError, match="rms_norm"):
        MambaConfig.from_dict({"d_model": 64, "n_layer": 2, "rms_norm": False})
    with pytest.raises(MambaError, match="num_hidden_layers"):
        MambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 0})
    with pytest.raises(MambaError, match="conv_kernel"):
        MambaConfig.from_dict({"hidden_size": 64, "num_hidden_layers": 1, "conv_kernel": 0})


def test_dtype_load_keeps_a_log_and_d_fp32():
    loaded = load_model("tiny-wikitext", dtype="bfloat16", device="cpu")
    mixer = loaded.model.backbone.layers[0].mixer
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.bfloat16


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(MambaError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(MambaError, match="no config.json"):
        load_model(str(tmp_path))


def test_wrong_shape_and_missing_tensor_are_named(tmp_path, tiny):
    state = read_state_dict(HF_DIR)
    state["backbone.layers.0.mixer.D"] = torch.ones(7)
    del state["backbone.norm_f.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(HF_DIR / "config.json", tmp_path)
    with pytest.raises(MambaError, match="missing tensor.*backbone.norm_f.weight"):
        load_model(str(tmp_path))
    state["backbone.norm_f.weight"] = torch.ones(128)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(MambaError, match=r"backbone.layers.0.mixer.D has shape \[7\], expected \[256\]"):
        load_model(str(tmp_path))


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    shutil.copy(ORIG_DIR / "config.json", tmp_path)
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MambaError, match="weights_only"):
        load_model(str(tmp_path))
