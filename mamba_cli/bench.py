"""`mamba bench`: llama-bench-style speed and memory figures you can paste into an issue."""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from mamba_core.errors import MambaUsageError

from .common import DEFAULT_MODEL, ModelOpt, RevisionOpt, StateDtypeOpt, check_state_dtype, command, err, set_state_dtype

EXAMPLES = """Examples:

  mamba bench -m tiny-wikitext -p 128 -g 32 -r 3

  mamba bench -m ../shared/configs/mamba-130m-hf -p 512,2048 -g 128 -d 0,4096      # random weights, real shape

  mamba bench -m state-spaces/mamba-130m-hf --dtype float32,bfloat16 -b 1,8 -o json
"""

COLUMNS = ("model", "params", "backend", "device", "dtype", "batch", "test", "t/s", "ms/tok", "peak mem")


def int_list(text: str, option: str, minimum: int) -> list[int]:
    """'512,2048' -> [512, 2048]; each value must be >= minimum (usage error otherwise)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MambaUsageError(f"{option} {text!r}: expected a comma list of integers") from None
    if not values or min(values) < minimum:
        raise MambaUsageError(f"{option} {text!r}: every value must be >= {minimum}")
    return values


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _markdown(rows: list[dict], footer: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" if c in ("params", "batch", "t/s", "ms/tok", "peak mem") else "---" for c in COLUMNS) + "|"]
    for r in rows:
        rate = f"{r['tokens_per_s_mean']:,.2f} ± {r['tokens_per_s_std']:,.2f}"
        extra = f" ({r['gflops']:,.1f} GFLOP/s)" if r["gflops"] is not None else f" ({r['gbps']:,.1f} GB/s)"
        ms = f"{r['ms_per_token']:.3f}" if r["ms_per_token"] is not None else "-"
        dtype = r["dtype"] + ("" if r["state_dtype"] == "float32" else f" ({r['state_dtype']} state)")
        cells = (r["model"], f"{r['params']:,}", r["backend"], r["device"], dtype, str(r["batch"]), r["test"], rate + extra, ms, _human_bytes(r["peak_mem_bytes"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + footer + "\n"


@command
def bench(
    model: ModelOpt = DEFAULT_MODEL,
    n_prompt: Annotated[str, typer.Option("--n-prompt", "-p", help="Prefill tests: prompt lengths (comma list; 0 skips).")] = "512",
    n_gen: Annotated[str, typer.Option("--n-gen", "-g", help="Decode tests: tokens generated one at a time (comma list; 0 skips).")] = "128",
    depth: Annotated[str, typer.Option("--depth", "-d", help="Decode after a prompt of this many tokens (comma list).")] = "0",
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Batch sizes (comma list).")] = "1",
    dtype: Annotated[str, typer.Option("--dtype", help="Comma list of auto, float32, bfloat16, float16.")] = "auto",
    backend: Annotated[str, typer.Option("--backend", help="Comma list of backends (auto, torch, ...).")] = "auto",
    quantize: Annotated[str, typer.Option("--quantize", help="Comma list of none, int8 (weight-only int8).")] = "none",
    state_dtype: StateDtypeOpt = "float32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1, help="Timed runs per test (after one warm-up).")] = 5,
    threads: Annotated[int, typer.Option("--threads", "-t", min=0, help="CPU threads (0: torch's default).")] = 0,
    output: Annotated[str, typer.Option("--output", "-o", help="md, json, jsonl or csv.")] = "md",
    revision: RevisionOpt = None,
) -> None:
    """Benchmark prefill and decode speed and peak memory over a grid of settings."""
    import time

    import torch

    from mamba_core.benchmark import BenchCase, environment, run_case
    from mamba_core.loading import load_model, resolve_device

    if output not in ("md", "json", "jsonl", "csv"):
        raise MambaUsageError(f"--output {output!r}: choose md, json, jsonl or csv")
    check_state_dtype(state_dtype)
    prompts, gens = int_list(n_prompt, "--n-prompt", 0), int_list(n_gen, "--n-gen", 0)
    depths, batches = int_list(depth, "--depth", 0), int_list(batch_size, "--batch-size", 1)
    cases = [BenchCase(b, n_prompt=p) for b in batches for p in prompts if p]
    cases += [BenchCase(b, n_gen=g, depth=d) for b in batches for g in gens if g for d in depths]
    if not cases:
        raise MambaUsageError("nothing to run: give a non-zero --n-prompt or --n-gen")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    interactive = sys.stderr.isatty()
    rows = []
    for dt, be, quant in itertools.product(dtype.split(","), backend.split(","), quantize.split(",")):
        start = time.perf_counter()
        loaded = load_model(model, dtype=dt, device=dev, revision=revision, backend=be, random_if_no_weights=True, quantize=quant)
        load_s = time.perf_counter() - start
        m = loaded.model
        set_state_dtype(m, state_dtype)
        if loaded.layout == "random" and not rows:
            err(f"note: {model} has no weights; using seeded random weights (figures are for speed only)")
        for case in cases:
            if interactive:
                err(f"running {case.test} batch {case.batch} {dt} {be} {quant} ...")
            row = run_case(m, case, repetitions)
            row.update(model=Path(model).name if loaded.layout != "random" else f"{Path(model).name} (random)",
                       params=m.num_parameters(), backend=m.backend, device=str(m.device),
                       dtype=str(m.dtype).replace("torch.", "") + ("+int8" if m.quantization else ""), setup_s=load_s + row.pop("warmup_s"),
                       state_dtype=str(m.state_dtype).replace("torch.", ""))
            rows.append(row)
        del loaded, m
    env = environment(dev)
    commit = _git_commit()
    footer = ", ".join(f"{k} {v}" for k, v in env.items()) + (f", commit {commit}" if commit else "")
    keys = ("model", "params", "backend", "device", "dtype", "state_dtype", "batch", "test", "n_prompt", "n_gen", "depth", "tokens_per_s_mean",
            "tokens_per_s_std", "ms_per_token", "samples", "peak_mem_bytes", "gflops", "gbps", "setup_s")
    records = [{k: r[k] for k in keys} for r in rows]
    if output == "md":
        sys.stdout.write(_markdown(rows, f"_{footer}_"))
    elif output == "json":
        sys.stdout.write(json.dumps(records, indent=2) + "\n")
    elif output == "jsonl":
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in records))
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "samples": ";".join(f"{s:.3f}" for s in r["samples"])})
        sys.stdout.write(buffer.getvalue())
    sys.stdout.flush()
