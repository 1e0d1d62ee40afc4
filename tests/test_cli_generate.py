"""`mamba generate` through typer's CliRunner and through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import run_cli
from mamba_cli.app import app

EXPECTED = " also a member of the city . \n \n = ="
runner = CliRunner()


def invoke(*args, input=None):
    return runner.invoke(app, list(args), input=input)


def test_generate_greedy_stdout_is_only_text():
    result = invoke("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "12", "The game was")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(EXPECTED)


def test_echo_and_json():
    echoed = invoke("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "5", "--echo", "The game was")
    assert echoed.stdout.startswith("The game was also a member")
    result = invoke("generate", "-m", "tiny-wikitext", "--seed", "3", "-n", "10", "--json", "The game was")
    record = json.loads(result.stdout)
    assert set(record) >= {"text", "prompt_ids", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "seed", "timings"}
    assert record["seed"] == 3 and record["completion_tokens"] == 10 and record["finish_reason"] == "length"
    again = json.loads(invoke("generate", "-m", "tiny-wikitext", "--seed", "3", "-n", "10", "--json", "The game was").stdout)
    assert again["token_ids"] == record["token_ids"]


def test_prompts_file_jsonl_in_order_and_equal_to_solo(tmp_path):
    prompts = ["The game was", "In 1998 , the team", "A"]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"r{i}", "prompt": p}) for i, p in enumerate(prompts)) + "\n")
    result = invoke("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "15", "--prompts-file", str(path))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    for prompt, row in zip(prompts, rows):
        solo = invoke("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "15", "--json", prompt)
        assert json.loads(solo.stdout)["text"] == row["text"]
    plain = tmp_path / "p.txt"
    plain.write_text("The game was\n\nA\n")
    rows = [json.loads(line) for line in invoke("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "3", "--prompts-file", str(plain)).stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["The game was", "A"]


def test_prompts_file_bad_line_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    result = invoke("generate", "-m", "tiny-wikitext", "--prompts-file", str(path))
    assert result.exit_code == 1 and "p.jsonl:2" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--top-p", "0"], ["--top-p", "1.5"], ["--temp", "-1"], ["-n", "-3"], ["--dtype", "float8"], ["--device", "tpu"], ["--backend", "nope"], ["--device", "cuda:7"],
     ["--state-dtype", "bfloat16"]],
)
def test_usage_errors_exit_2(args):
    result = invoke("generate", "-m", "tiny-wikitext", *args, "hi")
    assert result.exit_code == 2, (result.exit_code, result.output)


def test_state_in_the_model_dtype_generates():
    """--state-dtype model on a bf16 model: greedy text as with the float32 state for this short run
    (the state's one rounding per token moves the logits by ~1e-2 of their largest, not the argmax here)."""
    args = ("generate", "-m", "tiny-wikitext", "--dtype", "bfloat16", "--temp", "0", "-n", "12", "The game was")
    fp32, model = invoke(*args), invoke(*args, "--state-dtype", "model")
    assert model.exit_code == 0, model.output
    assert model.stdout == fp32.stdout


def test_missing_model_is_one_line_error(tmp_path):
    result = invoke("generate", "-m", str(tmp_path / "missing"), "hi")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error:") and "missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_subprocess_stdout_only_text_and_verbose_on_stderr():
    out = run_cli("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "12", "-v", "The game was")
    assert out.returncode == 0
    assert out.stdout.decode().startswith(EXPECTED)
    err = out.stderr.decode()
    assert "load:" in err and "prefill" in err and "decode:" in err and "\x1b[" not in err


def test_pipe_plus_argument_and_dash():
    piped = run_cli("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "5", "--json", "was", input=b"The game\n")
    assert json.loads(piped.stdout)["prompt_ids"] == json.loads(run_cli("generate", "-m", "tiny-wikitext", "-n", "1", "--json", "The game\nwas").stdout)["prompt_ids"]
    dash = run_cli("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "12", "-", input=b"The game was\n")
    assert dash.stdout.decode().startswith(EXPECTED)
    bad = run_cli("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "2", "-", input=b"The \xff game")
    assert bad.returncode == 0 and "not valid UTF-8" in bad.stderr.decode()


def test_closed_stdout_is_quiet():
    cmd = f"{sys.executable} -c 'from mamba_cli.app import main; main()' generate -m tiny-wikitext --ignore-eos -n 2000 'The game was' | head -c 10"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=120)
    assert len(out.stdout) == 10
    assert b"Traceback" not in out.stderr and b"Error" not in out.stderr
    assert out.returncode == 0


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom mamba_cli.app import app\n"
        "r = CliRunner().invoke(app, ['generate', '--help'])\nassert r.exit_code == 0 and 'Examples' in r.stdout, r.stdout\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()


def test_ctrl_c_keeps_output_and_exits_130():
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", "from mamba_cli.app import main; main()", "generate", "-m", "tiny-wikitext", "--ignore-eos", "-n", "100000", "The game was"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    first = proc.stdout.read(20)  # generation is under way
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(first + rest) > 20 and b"Traceback" not in err
