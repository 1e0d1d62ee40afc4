"""`mamba eval-ppl`: exactness across chunk sizes, the reference figure, protocols vs transformers, gates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from conftest import WIKITEXT
from mamba_cli.app import app
from mamba_core.documents import DataFile
from mamba_core.evaluation import Protocol, Unit, evaluate, make_units
from mamba_core.token_stream import Tokens

runner = CliRunner()
TEXT = WIKITEXT.read_text(encoding="utf-8")
SHORT = TEXT[:2500]  # ~600 tokens with the fixture tokenizer


def ppl_json(*args, input=None):
    result = runner.invoke(app, ["eval-ppl", "-m", "tiny-wikitext", "--json", *args], input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def short_file(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(SHORT, encoding="utf-8")
    return path


def test_exact_does_not_depend_on_chunk_size(short_file):
    sums = [ppl_json("--data", str(short_file), "--chunk-size", str(c))["nll_sum"] for c in (1, 7, 64, 4096)]
    assert max(sums) - min(sums) <= 1e-6 * abs(sums[0])


def test_batched_equals_unbatched(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": SHORT[i * 300 : (i + 1) * 300 + 37 * i]}) for i in range(6)))
    one = ppl_json("--data", str(path))
    many = ppl_json("--data", str(path), "--batch-size", "4")
    assert abs(one["nll_sum"] - many["nll_sum"]) <= 1e-6 * abs(one["nll_sum"]) and one["tokens_scored"] == many["tokens_scored"]


def test_window_reproduces_reference_figure():
    report = ppl_json("--data", str(WIKITEXT), "--window", "1024", "--batch-size", "8")
    assert report["tokens_scored"] == 432_852
    assert abs(report["nll_sum"] - 2_265_869.2) / 2_265_869.2 <= 1e-5
    assert round(report["ppl"], 2) == 187.68
    assert report["bytes"] == 1_290_590  # every byte of the file is covered by scored tokens


def _reference_nll(reference, units):
    total = 0.0
    for unit in units:
        ids = unit.tokens[0].ids.long()
        with torch.no_grad():
            logits = reference(ids[None]).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
        total += nll[unit.first - 1 :].double().sum().item()
    return total


@pytest.mark.parametrize("protocol", [Protocol("window", 100), Protocol("llama-cpp", 128, chunks=3, bos=False), Protocol("exact")])
def test_protocols_match_transformers(tiny, tiny_tokenizer, reference, protocol, short_file):
    units = [Unit([Tokens.cat(list(u.tokens))], u.first, u.file) for u in make_units(protocol, tiny_tokenizer, [DataFile(str(short_file))])]
    if protocol.name == "llama-cpp":
        assert len(units) == 3 and all(len(u.tokens[0]) - u.first == 128 - 1 - 64 for u in units)
        assert units[1].tokens[0].ids.tolist() == tiny_tokenizer.encode(SHORT, add_special_tokens=False)[128:256]  # no BOS: NeoX-style
    ours = evaluate(tiny.model, units, 1, chunk_size=37, batch_size=2).total.nll_sum
    assert abs(ours - _reference_nll(reference, units)) <= 1e-5 * abs(ours)


def test_human_output_and_multiple_files(tmp_path, short_file):
    other = tmp_path / "other.txt"
    other.write_text(TEXT[5000:6000], encoding="utf-8")
    result = runner.invoke(app, ["eval-ppl", "-m", "tiny-wikitext", "--data", str(short_file), "--data", str(other)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PPL = ") and "+/-" in lines[0]
    assert any(line.startswith("total") for line in lines)
    report = ppl_json("--data", str(short_file), "--data", str(other))
    files = report["files"]
    assert len(files) == 2 and files[0]["path"] == str(short_file)
    assert report["tokens_scored"] == sum(f["tokens_scored"] for f in files)
    assert abs(report["nll_sum"] - sum(f["nll_sum"] for f in files)) < 1e-6 * report["nll_sum"]


def test_json_schema(short_file):
    report = ppl_json("--data", str(short_file))
    for key in ("model", "data", "protocol", "tokens_scored", "nll_sum", "nll_mean", "ppl", "ppl_stderr", "bits_per_byte",
                "byte_ppl", "word_ppl", "tokens_per_s", "dtype", "backend", "files"):
        assert key in report, key
    assert set(report["data"][0]) >= {"path", "sha256", "bytes", "words"}
    assert report["protocol"]["name"] == "exact" and report["dtype"] == "float32"
    assert report["ppl"] == pytest.approx(2.718281828 ** report["nll_mean"])


def test_jsonl_stdin_limit_and_no_bos(tmp_path, short_file):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": SHORT}) + "\n")
    from_jsonl = ppl_json("--data", str(path), "--text-field", "body")
    from_stdin = ppl_json("--data", "-", input=SHORT)
    assert from_jsonl["nll_sum"] == pytest.approx(from_stdin["nll_sum"], rel=1e-9)
    limited = ppl_json("--data", str(short_file), "--limit-tokens", "100")
    assert limited["tokens_scored"] == 100
    no_bos = ppl_json("--data", str(short_file), "--no-bos")
    assert no_bos["tokens_scored"] == from_stdin["tokens_scored"] - 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    result = runner.invoke(app, ["eval-ppl", "-m", "tiny-wikitext", "--data", str(bad)])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.stderr


def test_gates_exit_codes(short_file):
    args = ["eval-ppl", "-m", "tiny-wikitext", "--data", str(short_file), "--limit-tokens", "200"]
    ppl = ppl_json(*args[3:])["ppl"]
    assert runner.invoke(app, [*args, "--max-ppl", str(ppl * 1.01)]).exit_code == 0
    failed = runner.invoke(app, [*args, "--max-ppl", str(ppl * 0.99)])
    assert failed.exit_code == 3 and "Gate failed" in failed.stderr
    assert runner.invoke(app, [*args, "--expect-ppl", str(ppl), "--rtol", "1e-6"]).exit_code == 0
    assert runner.invoke(app, [*args, "--expect-ppl", str(ppl * 1.1), "--rtol", "0.01"]).exit_code == 3
    assert runner.invoke(app, [*args, "--max-kl", "1"]).exit_code == 2  # needs --kl-base
    assert runner.invoke(app, [*args, "--window", "10", "--llama-cpp-compat", "--ctx", "64"]).exit_code == 2


def test_kl_self_is_zero_and_bf16_small(short_file):
    same = ppl_json("--data", str(short_file), "--kl-base", "tiny-wikitext", "--limit-tokens", "300")["kl"]
    assert same["kl_mean"] == 0 and same["kl_max"] == 0 and same["top1_agreement"] == 1.0
    bf16 = ppl_json("--data", str(short_file), "--dtype", "bfloat16", "--kl-base", "tiny-wikitext", "--limit-tokens", "300")["kl"]
    assert 0 < bf16["kl_mean"] < 5e-3 and bf16["top1_agreement"] > 0.95
    gate = runner.invoke(app, ["eval-ppl", "-m", "tiny-wikitext", "--data", str(short_file), "--dtype", "bfloat16",
                               "--kl-base", "tiny-wikitext", "--limit-tokens", "300", "--max-kl", "1e-9"])
    assert gate.exit_code == 3


def test_state_in_the_model_dtype(short_file):
    """--state-dtype model: perplexity over chunked prefills (the state rounded between chunks) within
    a hair of the float32 state's, and a KL against the float32 model as small as bf16's own."""
    args = ("--data", str(short_file), "--dtype", "bfloat16", "--limit-tokens", "300", "--chunk-size", "64", "--kl-base", "tiny-wikitext")
    fp32, model = ppl_json(*args), ppl_json(*args, "--state-dtype", "model")
    assert abs(model["ppl"] / fp32["ppl"] - 1) < 1e-2
    assert model["kl"]["kl_mean"] < 5e-3 and model["kl"]["top1_agreement"] > 0.95


PEAK_RSS = """
import resource, sys
from mamba_cli.app import app
try:
    app(["eval-ppl", "-m", "tiny-wikitext", "--data", sys.argv[1], "--json"], standalone_mode=False)
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def test_memory_does_not_grow_with_document_length(tmp_path):
    tenth = tmp_path / "tenth.txt"
    tenth.write_text(TEXT[: len(TEXT) // 10], encoding="utf-8")

    def peak(path):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr.decode()
        return int(out.stderr.decode().strip().splitlines()[-1])

    small, whole = peak(tenth), peak(WIKITEXT)
    assert whole <= 1.10 * small, (small, whole)


@pytest.mark.slow
def test_memory_flat_on_a_10_megabyte_document(tmp_path):
    """A 10 MB document (WikiText-2 test x 8) peaks no higher than its first tenth (within 10%)."""
    big, tenth = tmp_path / "big.txt", tmp_path / "tenth.txt"
    text = TEXT * 8
    big.write_text(text, encoding="utf-8")
    tenth.write_text(text[: len(text) // 10], encoding="utf-8")

    def peak(path):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, timeout=3600)
        assert out.returncode == 0, out.stderr.decode()
        return int(out.stderr.decode().strip().splitlines()[-1])

    assert big.stat().st_size > 10_000_000
    small, whole = peak(tenth), peak(big)
    assert whole <= 1.10 * small, (small, whole)


def test_kl_stats_constant_memory_and_exact_below_the_reservoir():
    from mamba_core.evaluation import KLStats

    values = torch.rand(5000, generator=torch.Generator().manual_seed(3)) ** 4
    small = KLStats()
    for chunk in values.split(777):
        small.add(chunk)
    report = small.report()
    assert report["kl_p99"] == pytest.approx(torch.quantile(values.double(), 0.99).item(), rel=1e-12)
    assert report["kl_mean"] == pytest.approx(values.double().mean().item(), rel=1e-12) and report["kl_max"] == values.max().item()
    KLStats.RESERVOIR, saved = 500, KLStats.RESERVOIR  # a tiny reservoir: bounded size, p99 still close
    try:
        sampled = KLStats()
        for chunk in values.split(777):
            sampled.add(chunk)
        assert len(sampled.sample) == 500 and sampled.count == 5000
        assert abs(sampled.report()["kl_p99"] - report["kl_p99"]) < 0.08
    finally:
        KLStats.RESERVOIR = saved
