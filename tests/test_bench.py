"""`mamba bench`: output formats parse, JSON schema, random-weight mode, invalid grids. No speed asserts."""

from __future__ import annotations

import csv
import io
import json

import pytest
from typer.testing import CliRunner

from mamba_cli.app import app

runner = CliRunner()
TINY = ["bench", "-m", "tiny-wikitext", "-p", "16", "-g", "4", "-r", "2"]
KEYS = {"model", "params", "backend", "device", "dtype", "state_dtype", "batch", "test", "n_prompt", "n_gen", "depth", "tokens_per_s_mean",
        "tokens_per_s_std", "ms_per_token", "samples", "peak_mem_bytes", "gflops", "gbps", "setup_s"}


def test_markdown_table():
    result = runner.invoke(app, TINY + ["-d", "0,32"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| model | params | backend | device | dtype | batch | test | t/s | ms/tok | peak mem |"
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert [r.split("|")[7].strip() for r in rows] == ["pp16", "tg4", "tg4@d32"]
    assert "961,920" in rows[0] and "GFLOP/s" in rows[0] and "GB/s" in rows[1]
    assert lines[-1].startswith("_mamba ") and "torch" in lines[-1]


def test_json_schema_and_other_formats():
    records = json.loads(runner.invoke(app, TINY + ["-b", "1,2", "-o", "json"]).stdout)
    assert len(records) == 4 and all(set(r) == KEYS for r in records)
    assert sorted((r["test"], r["batch"]) for r in records) == [("pp16", 1), ("pp16", 2), ("tg4", 1), ("tg4", 2)]
    pp = records[0]
    assert pp["test"] == "pp16" and pp["n_prompt"] == 16 and len(pp["samples"]) == 2 and pp["gflops"] > 0 and pp["ms_per_token"] is None
    tg = next(r for r in records if r["test"] == "tg4" and r["batch"] == 2)
    assert tg["gbps"] > 0 and tg["ms_per_token"] > 0 and tg["peak_mem_bytes"] > 0 and tg["setup_s"] > 0
    lines = runner.invoke(app, TINY + ["-o", "jsonl"]).stdout.strip().splitlines()
    assert [json.loads(line)["test"] for line in lines] == ["pp16", "tg4"]
    table = list(csv.DictReader(io.StringIO(runner.invoke(app, TINY + ["-o", "csv"]).stdout)))
    assert [row["test"] for row in table] == ["pp16", "tg4"] and set(table[0]) == KEYS


def test_state_dtype_column():
    """--state-dtype model: the cache keeps the SSM state in the model dtype, said in the table and JSON."""
    records = json.loads(runner.invoke(app, TINY + ["--dtype", "bfloat16", "--state-dtype", "model", "-o", "json"]).stdout)
    assert {r["state_dtype"] for r in records} == {"bfloat16"} and all(r["tokens_per_s_mean"] > 0 for r in records)
    table = runner.invoke(app, TINY + ["--dtype", "bfloat16", "--state-dtype", "model"]).stdout
    assert "bfloat16 (bfloat16 state)" in table
    assert json.loads(runner.invoke(app, TINY + ["-o", "json"]).stdout)[0]["state_dtype"] == "float32"


def test_random_weights_from_config_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256}))
    result = runner.invoke(app, ["bench", "-m", str(tmp_path), "-p", "8", "-g", "2", "-r", "1", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert "random" in result.stderr and "speed only" in result.stderr
    record = json.loads(result.stdout)[0]
    assert record["model"].endswith("(random)") and record["params"] == 81_856
    # per layer: norm 64 + in_proj 64*256 + conv 128*4+128 + x_proj 128*36 + dt_proj 4*128+128 + A_log 128*16 + D 128
    # + out_proj 128*64 = 32,704; two layers + embedding 256*64 (tied head) + norm_f 64 = 81,856


@pytest.mark.parametrize("args", [["-p", "-1"], ["-b", "0"], ["-g", "x"], ["--backend", "nope"], ["-o", "xml"], ["-p", "0", "-g", "0"], ["-r", "0"],
                                  ["--state-dtype", "int8"]])
def test_invalid_grids_are_usage_errors(args):
    result = runner.invoke(app, ["bench", "-m", "tiny-wikitext", *args])
    assert result.exit_code == 2, result.output


def test_params_of_the_130m_shape():
    from mamba_core.config import MambaConfig
    from mamba_core.model import MambaForCausalLM

    import torch

    with torch.device("meta"):
        model = MambaForCausalLM(MambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280))
    assert model.num_parameters() == 129_135_360
