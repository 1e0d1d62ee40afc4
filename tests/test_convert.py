"""`mamba convert`: every direction on both fixtures, dtypes, sharding, GGUF, refusals, atomicity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import HF_DIR, ORIG_DIR, rel_err
from mamba_cli.app import app
from mamba_core.loading import load_model, read_state_dict

runner = CliRunner()
IDS = torch.randint(0, 2045, (1, 40), generator=torch.Generator().manual_seed(0))


def convert(*args):
    result = runner.invoke(app, ["convert", *map(str, args)])
    return result


def logits(path):
    return load_model(str(path), dtype="float32", device="cpu").model(IDS)


def test_orig_to_hf_and_back_bit_for_bit(tmp_path):
    assert convert(ORIG_DIR, tmp_path / "hf").exit_code == 0
    assert convert(HF_DIR, tmp_path / "orig", "--to", "orig").exit_code == 0
    assert convert(tmp_path / "orig", tmp_path / "hf2").exit_code == 0
    reference = read_state_dict(HF_DIR)
    for out in (tmp_path / "hf", tmp_path / "hf2"):
        converted = read_state_dict(out)
        assert set(converted) == set(reference)
        assert all(torch.equal(converted[k], reference[k]) for k in reference)
    orig_state = torch.load(tmp_path / "orig" / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in orig_state
    orig_config = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert {"d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"} <= set(orig_config)


def test_hf_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    result = convert(ORIG_DIR, tmp_path / "hf")
    assert result.exit_code == 0 and result.stdout.strip().splitlines()[-1] == str(tmp_path / "hf")
    assert "max |logit difference| 0" in result.stderr
    ref = transformers.MambaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        expected = ref(IDS).logits
    assert rel_err(logits(ORIG_DIR), expected) <= 1e-5
    assert (tmp_path / "hf" / "generation_config.json").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_bfloat16_keeps_a_log_and_d_fp32_and_shards(tmp_path):
    assert convert(HF_DIR, tmp_path / "bf", "--dtype", "bfloat16", "--max-shard-size", "1MB").exit_code == 0
    config = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    index = json.loads((tmp_path / "bf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    dtypes = {}
    for shard in shards:
        with safe_open(tmp_path / "bf" / shard, "pt") as f:
            dtypes.update({k: f.get_tensor(k).dtype for k in f.keys()})
    assert dtypes["backbone.layers.0.mixer.A_log"] == torch.float32 and dtypes["backbone.layers.0.mixer.D"] == torch.float32
    assert dtypes["backbone.layers.0.mixer.in_proj.weight"] == torch.bfloat16
    assert 0 < rel_err(logits(tmp_path / "bf"), logits(HF_DIR)) < 3e-2


def test_gguf_layout_and_round_trip(tmp_path):
    gguf = pytest.importorskip("gguf")
    assert convert(HF_DIR, tmp_path / "m.gguf", "--to", "gguf").exit_code == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "mamba"
    assert fields["mamba.embedding_length"] == 128 and fields["mamba.block_count"] == 6
    assert fields["mamba.ssm.conv_kernel"] == 4 and fields["mamba.ssm.inner_size"] == 256
    assert fields["mamba.ssm.state_size"] == 16 and fields["mamba.ssm.time_step_rank"] == 8
    assert fields["mamba.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2" and reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 2048
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ssm_in.weight", "blk.0.ssm_conv1d.weight",
            "blk.0.ssm_conv1d.bias", "blk.0.ssm_x.weight", "blk.0.ssm_dt.weight", "blk.0.ssm_dt.bias", "blk.0.ssm_a", "blk.0.ssm_d",
            "blk.0.ssm_out.weight"} <= set(tensors)
    assert list(tensors["blk.0.ssm_conv1d.weight"].shape) == [4, 256]  # GGUF order of [inner, kernel]
    a_log = read_state_dict(HF_DIR)["backbone.layers.0.mixer.A_log"]
    assert torch.allclose(torch.from_numpy(tensors["blk.0.ssm_a"].data.copy()), -torch.exp(a_log))
    # loads as a model with its embedded tokenizer, and converts back
    assert (logits(tmp_path / "m.gguf") - logits(HF_DIR)).abs().max() <= 1e-4
    result = runner.invoke(app, ["generate", "-m", str(tmp_path / "m.gguf"), "--temp", "0", "-n", "8", "The game was"])
    assert result.stdout.startswith(" also a member of the city")
    assert convert(tmp_path / "m.gguf", tmp_path / "back").exit_code == 0
    assert (logits(tmp_path / "back") - logits(HF_DIR)).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0"])
def test_gguf_low_precision(tmp_path, kind):
    pytest.importorskip("gguf")
    result = convert(HF_DIR, tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", kind)
    assert result.exit_code == 0, result.output
    assert 0 < rel_err(logits(tmp_path / "m.gguf"), logits(HF_DIR)) < 5e-2


def test_refusals(tmp_path):
    (tmp_path / "exists").mkdir()
    refused = convert(HF_DIR, tmp_path / "exists")
    assert refused.exit_code == 1 and "--force" in refused.stderr
    assert convert(HF_DIR, tmp_path / "exists", "--force").exit_code == 0
    assert (tmp_path / "exists" / "model.safetensors").is_file()
    assert convert(HF_DIR, tmp_path / "x", "--to", "onnx").exit_code == 2
    assert convert(HF_DIR, tmp_path / "x", "--dtype", "int4").exit_code == 2
    assert convert(HF_DIR, tmp_path / "x", "--gguf-type", "Q8_0").exit_code == 2  # needs --to gguf
    assert convert(HF_DIR, tmp_path / "x", "--max-shard-size", "lots").exit_code == 2
    broken = tmp_path / "broken"
    shutil.copytree(HF_DIR, broken)
    state = read_state_dict(broken)
    state["backbone.layers.2.mixer.x_proj.weight"] = torch.zeros(3, 3)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, broken / "model.safetensors")
    bad = convert(broken, tmp_path / "never")
    assert bad.exit_code == 1 and "backbone.layers.2.mixer.x_proj.weight" in bad.stderr and "[3, 3]" in bad.stderr
    assert not (tmp_path / "never").exists()


def test_failed_verification_leaves_nothing(tmp_path, monkeypatch):
    from mamba_core import convert as convert_module

    monkeypatch.setitem(convert_module.TOLERANCE, "bfloat16", 0.0)
    result = convert(HF_DIR, tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 1 and "verification failed" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_leaves_no_output(tmp_path):
    from safetensors.torch import save_file

    from mamba_core.config import MambaConfig
    from mamba_core.model import MambaForCausalLM

    big = tmp_path / "big"  # large enough (~200 MB) that the conversion takes a while
    big.mkdir()
    config = MambaConfig(hidden_size=512, num_hidden_layers=16, vocab_size=50280)
    (big / "config.json").write_text(json.dumps(config.to_dict()))
    model = MambaForCausalLM(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, big / "model.safetensors")
    del model
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from mamba_cli.app import main; main()", "convert", str(big), str(out), "--dtype", "bfloat16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.*.partial")):
        time.sleep(0.02)
    assert list(tmp_path.glob(".out.*.partial")), "conversion never started writing"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_interrupt_just_after_the_partial_folder_appears_leaves_nothing(tmp_path, monkeypatch):
    """The race the subprocess test above can hit on a loaded machine: Ctrl-C lands the moment
    the temporary folder exists, before any file is written into it."""
    from pathlib import Path

    real_mkdir = Path.mkdir

    def mkdir_then_interrupt(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt

    monkeypatch.setattr(Path, "mkdir", mkdir_then_interrupt)
    result = convert(HF_DIR, tmp_path / "out", "--no-verify")
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("src", [HF_DIR, ORIG_DIR], ids=["from-hf", "from-orig"])
@pytest.mark.parametrize("to", ["hf", "orig", "gguf"])
def test_every_direction_on_both_fixtures(tmp_path, src, to):
    out = tmp_path / ("m.gguf" if to == "gguf" else "out")
    result = convert(src, out, "--to", to)
    assert result.exit_code == 0, result.output
    back = tmp_path / "back"
    assert convert(out, back).exit_code == 0  # and back to hf from each format
    for path in (out, back):
        assert (logits(path) - logits(src)).abs().max() <= 1e-4


def test_output_has_the_usual_permissions(tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, ["convert", "tiny-wikitext", str(out)]).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the 0o700 of a temporary directory
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in out.iterdir())


def test_keep_fp32_parts(tmp_path):
    assert convert(HF_DIR, tmp_path / "bf", "--dtype", "bfloat16", "--keep-fp32", "conv,norm").exit_code == 0
    with safe_open(tmp_path / "bf" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["backbone.layers.0.mixer.conv1d.weight"] == torch.float32 and dtypes["backbone.layers.0.norm.weight"] == torch.float32
    assert dtypes["backbone.norm_f.weight"] == torch.float32 and dtypes["backbone.layers.0.mixer.x_proj.weight"] == torch.bfloat16
    assert convert(HF_DIR, tmp_path / "x", "--keep-fp32", "embeddings").exit_code == 2
