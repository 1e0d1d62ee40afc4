"""Shared fixtures: paths to the test data, the fixture model, and the transformers reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from mamba_core.loading import EMBEDDED, load_model

FIXTURES = Path(__file__).parent / "fixtures"
HF_DIR = EMBEDDED["tiny-wikitext"]
ORIG_DIR = FIXTURES / "tiny-wikitext-mamba-orig"
NEOX_TOKENIZER = FIXTURES / "gpt-neox-20b-tokenizer" / "tokenizer.json"
WIKITEXT = FIXTURES / "wikitext-2-raw" / "wiki.test.raw"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="session")
def tiny():
    """The fixture model (float32, CPU, torch backend) as loaded by the tool."""
    return load_model("tiny-wikitext", dtype="float32", device="cpu", backend="torch")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny):
    from mamba_core.api import load_tokenizer

    return load_tokenizer(tiny)


@pytest.fixture(scope="session")
def reference():
    """transformers' MambaForCausalLM on the same weights (the numerical reference)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.MambaForCausalLM.from_pretrained(str(HF_DIR), dtype=torch.float32).eval()


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None, timeout: int = 120):
    """Run the real `mamba` entry point in a subprocess; returns CompletedProcess (bytes)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from mamba_cli.app import main; main()", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
