"""Reliability: every bad input is a one-line error with the documented exit code, never a traceback."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from typer.testing import CliRunner

from conftest import HF_DIR, NEOX_TOKENIZER
from mamba_cli.app import app

runner = CliRunner()


def gen(model, *extra):
    return runner.invoke(app, ["generate", "-m", str(model), "-n", "2", *extra, "hi"])


def assert_one_line_error(result, code=1, *needles):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    shutil.copytree(HF_DIR, path)
    return path


# ---------------------------------------------------------------- model resolution
def test_gated_repo_without_token(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        # the hub's own error type; its constructor wants an HTTP response object, which differs across versions
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "401 Client Error: access to model org/gated is restricted")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    assert_one_line_error(gen("org/gated"), 1, "org/gated", "HF_TOKEN")


# ---------------------------------------------------------------- config.json
@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"model_type": "mamba"}), "hidden_size"),
        (json.dumps({"hidden_size": 128}), "num_hidden_layers"),
        (json.dumps({"hidden_size": "wide", "num_hidden_layers": 6}), "hidden_size"),
        (json.dumps({"hidden_size": 128, "num_hidden_layers": 0}), "num_hidden_layers"),
        (json.dumps({"hidden_size": -4, "num_hidden_layers": 6}), "hidden_size"),
        (json.dumps({"hidden_size": 128, "num_hidden_layers": 6, "conv_kernel": 0}), "conv_kernel"),
        (json.dumps({"hidden_size": 128, "num_hidden_layers": 6, "vocab_size": 10**12}), "vocab_size"),
        (json.dumps({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 6}), "llama"),
        (json.dumps({"hidden_size": 128, "num_hidden_layers": 6, "quantization_config": {"quant_method": "gptq"}}), "quantization_config"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_config(model_dir, content, needle):
    (model_dir / "config.json").write_text(content)
    assert_one_line_error(gen(model_dir), 1, "config.json", needle)


# ---------------------------------------------------------------- weights
def test_truncated_and_corrupt_safetensors(model_dir):
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(gen(model_dir), 1, "model.safetensors")
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert_one_line_error(gen(model_dir), 1, "model.safetensors")


def test_safetensors_header_claiming_huge_sizes(model_dir):
    header = json.dumps({"backbone.embeddings.weight": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}).encode()
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 64)
    assert_one_line_error(gen(model_dir), 1, "model.safetensors")
    (model_dir / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    assert_one_line_error(gen(model_dir), 1, "model.safetensors")


def test_unexpected_tensor_is_named(model_dir):
    from safetensors.torch import save_file

    from mamba_core.loading import read_state_dict

    state = read_state_dict(model_dir)
    state["backbone.layers.0.mixer.extra"] = torch.zeros(2)
    save_file({k: v.contiguous() for k, v in state.items()}, model_dir / "model.safetensors")
    assert_one_line_error(gen(model_dir), 1, "backbone.layers.0.mixer.extra")


def test_shard_index_outside_directory_and_missing_shard(model_dir, tmp_path):
    (model_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"backbone.norm_f.weight": "../outside.safetensors"}}))
    assert_one_line_error(gen(model_dir), 1, "outside the model directory")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"backbone.norm_f.weight": "model-1.safetensors"}}))
    assert_one_line_error(gen(model_dir), 1, "model-1.safetensors", "missing")
    (model_dir / "model.safetensors.index.json").write_text("[]")
    assert_one_line_error(gen(model_dir), 1, "index")


def test_nan_weights_warn(model_dir):
    from safetensors.torch import save_file

    from mamba_core.loading import read_state_dict

    state = read_state_dict(model_dir)
    state["backbone.layers.1.mixer.D"][3] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, model_dir / "model.safetensors")
    result = gen(model_dir, "--temp", "0")
    assert result.exit_code == 0 and "Warning:" in result.stderr and "NaN" in result.stderr


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_missing_corrupt_or_too_large(model_dir):
    (model_dir / "tokenizer.json").write_text("{broken")
    assert_one_line_error(gen(model_dir), 1, "tokenizer.json")
    assert_one_line_error(gen(model_dir, "--tokenizer", str(model_dir / "nope.json")), 1, "nope.json")
    # the GPT-NeoX tokenizer has 50277 tokens; the fixture embeds 2048
    assert_one_line_error(gen(model_dir, "--tokenizer", str(NEOX_TOKENIZER)), 1, "50277", "2048")


# ---------------------------------------------------------------- data files
def test_data_file_errors(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait, the game was".encode("latin-1"))
    base = ["eval-ppl", "-m", "tiny-wikitext", "--data"]
    assert_one_line_error(runner.invoke(app, [*base, str(binary)]), 1, "binary")
    assert_one_line_error(runner.invoke(app, [*base, str(empty)]), 1, "no text")
    assert_one_line_error(runner.invoke(app, [*base, str(tmp_path / "missing.txt")]), 1, "missing.txt")
    replaced = runner.invoke(app, [*base, str(latin), "--json"])
    assert replaced.exit_code == 0 and "not valid UTF-8" in replaced.stderr


# ---------------------------------------------------------------- options and resources
def test_float16_on_cpu_warns_and_runs():
    result = runner.invoke(app, ["generate", "-m", "tiny-wikitext", "--dtype", "float16", "--temp", "0", "-n", "3", "The game was"])
    assert result.exit_code == 0 and "float16 on the CPU" in result.stderr


def test_cuda_requested_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(gen("tiny-wikitext", "--device", "cuda"), 2, "CUDA is not available")


def test_out_of_memory_message(monkeypatch):
    from mamba_core import generation

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(generation.Generation, "_prefill", oom)
    result = gen("tiny-wikitext")
    assert_one_line_error(result, 1, "out of memory", "20.00 GiB", "--batch-size")


def test_disk_full_during_convert_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = runner.invoke(app, ["convert", "tiny-wikitext", str(tmp_path / "out")])
    assert_one_line_error(result, 1, "No space left", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_unforeseen_error_is_one_line_unless_debugging(monkeypatch):
    from mamba_core import generation

    def boom(*args, **kwargs):
        raise ValueError("something odd\nsecond line")

    monkeypatch.setattr(generation.Generation, "_prefill", boom)
    assert_one_line_error(gen("tiny-wikitext"), 1, "ValueError: something odd", "MAMBA_DEBUG=1")
    monkeypatch.setenv("MAMBA_DEBUG", "1")
    assert "Traceback" in gen("tiny-wikitext").stderr


# ---------------------------------------------------------------- long runs keep memory flat
PEAK = """
import resource, sys
from mamba_cli.app import app
try:
    app(["generate", "-m", "tiny-wikitext", "--ignore-eos", "--temp", "0", "-n", sys.argv[1], "The game was"], standalone_mode=False)
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def test_generating_20000_tokens_keeps_memory_flat():
    import subprocess
    import sys

    def peak(n):
        out = subprocess.run([sys.executable, "-c", PEAK, str(n)], capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, out.stderr.decode()[-500:]
        return int(out.stderr.decode().strip().splitlines()[-1])

    short, long = peak(500), peak(20000)
    assert long <= short * 1.05 + 8 * 1024, (short, long)  # ru_maxrss is in KiB: within 5% + 8 MiB
