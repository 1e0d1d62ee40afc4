"""Interoperability with llama.cpp itself (slow: needs a llama.cpp build; `pytest -m slow`).

Set MAMBA_LLAMA_CPP to a llama.cpp source tree built with CMake into build/ (for example the one
vendored in the `llama-cpp-python` sdist: see benchmarks/build_llama_cpp.sh). Checked:
our GGUF loads in llama.cpp with the same logits; a GGUF from llama.cpp's convert_hf_to_gguf.py
loads in mamba with the same logits; our --llama-cpp-compat perplexity equals llama-perplexity's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import HF_DIR, NEOX_TOKENIZER, WIKITEXT
from mamba_cli.app import app
from mamba_core.config import MambaConfig
from mamba_core.loading import load_model
from mamba_core.model import MambaForCausalLM

pytestmark = pytest.mark.slow
ROOT = Path(os.environ.get("MAMBA_LLAMA_CPP", "/nonexistent"))
BIN = ROOT / "build" / "bin"
if not (BIN / "llama-perplexity").exists():
    pytest.skip("no llama.cpp build (set MAMBA_LLAMA_CPP)", allow_module_level=True)

runner = CliRunner()
IDS = [int(i) for i in torch.randint(0, 2045, (40,), generator=torch.Generator().manual_seed(0))]


@pytest.fixture(scope="module")
def dump_logits(tmp_path_factory) -> Path:
    """Compile tests/llama_cpp/dump_logits.cpp against the llama.cpp build."""
    exe = tmp_path_factory.mktemp("bin") / "dump_logits"
    source = Path(__file__).parent / "llama_cpp" / "dump_logits.cpp"
    subprocess.run(["g++", "-O2", "-std=c++17", str(source), "-o", str(exe), f"-I{ROOT / 'include'}", f"-I{ROOT / 'ggml' / 'include'}",
                    f"-L{BIN}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{BIN}"], check=True)
    return exe


def llama_logits(exe: Path, gguf: Path, ids: list[int]) -> torch.Tensor:
    out = subprocess.run([str(exe), str(gguf), "--ids", *map(str, ids)], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert [int(x) for x in lines[0].split()] == ids
    return torch.tensor([[float(x) for x in line.split()] for line in lines[1:]])


def test_our_gguf_in_llama_cpp(tmp_path, dump_logits):
    gguf = tmp_path / "tiny.gguf"
    assert runner.invoke(app, ["convert", str(HF_DIR), str(gguf), "--to", "gguf"]).exit_code == 0
    theirs = llama_logits(dump_logits, gguf, IDS)
    ours = load_model("tiny-wikitext").model(torch.tensor([IDS]))[0]
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-3


def _neox_model(tmp_path: Path) -> Path:
    """A small random HF-layout model with the GPT-NeoX tokenizer (which llama.cpp's converter knows)."""
    model_dir = tmp_path / "neox-mamba"
    model_dir.mkdir()
    config = MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=50280)
    torch.manual_seed(0)
    model = MambaForCausalLM(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, model_dir / "model.safetensors")
    (model_dir / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copy(NEOX_TOKENIZER, model_dir / "tokenizer.json")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>",
                                                                 "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return model_dir


def test_llama_cpp_converter_output_loads_in_mamba(tmp_path, dump_logits):
    model_dir = _neox_model(tmp_path)
    gguf = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(gguf), "--outtype", "f32"],
                   check=True, capture_output=True)
    ids = [12092, 1533, 310, 247, 1071, 15, 187, 510, 2021, 369]
    reference = load_model(str(model_dir)).model(torch.tensor([ids]))[0]
    loaded = load_model(str(gguf))
    assert (loaded.model(torch.tensor([ids]))[0] - reference).abs().max().item() <= 1e-4
    assert (llama_logits(dump_logits, gguf, ids) - reference).abs().max().item() <= 1e-3
    result = runner.invoke(app, ["generate", "-m", str(gguf), "--temp", "0", "-n", "3", "--json", "Hello world"])
    assert json.loads(result.stdout)["prompt_ids"] == [12092, 1533]  # tokenizer taken from the file


def test_perplexity_matches_llama_perplexity(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    assert runner.invoke(app, ["convert", str(HF_DIR), str(gguf), "--to", "gguf"]).exit_code == 0
    text = tmp_path / "wiki.txt"
    text.write_text(WIKITEXT.read_text(encoding="utf-8")[:60000], encoding="utf-8")
    out = subprocess.run([str(BIN / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "256", "-b", "256", "--chunks", "20", "-t", "2"],
                         capture_output=True, text=True, check=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stderr[-2000:]
    theirs = float(match.group(1))
    result = runner.invoke(app, ["eval-ppl", "-m", str(gguf), "--data", str(text), "--llama-cpp-compat", "--ctx", "256", "--chunks", "20", "--json"])
    ours = json.loads(result.stdout)
    assert ours["tokens_scored"] == 20 * (256 - 1 - 128)
    assert abs(ours["ppl"] - theirs) / theirs <= 1e-4, (ours["ppl"], theirs)
    assert abs(ours["ppl_stderr"] - float(match.group(2))) <= 0.01 * float(match.group(2)) + 1e-3
