"""Decoding with the SSM state in float32 and in the model dtype (bf16), in one process.

    python benchmarks/state_dtype_ab.py --configs benchmarks/configs/mamba-130m-hf --batch 1,8,64

Random weights, bf16, each case run as `mamba bench` runs it (CUDA graphs, 128 tokens), the two
state dtypes alternating `--rounds` times; medians of ms per token. At batch 64 of the 130m the
decode step reads and writes 6.3 MB of float32 state per layer: half of that in bf16.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mamba_core.benchmark import BenchCase, run_case
from mamba_core.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="benchmarks/configs/mamba-130m-hf", help="comma-separated model directories")
    parser.add_argument("--batch", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| model | batch | float32 state ms | bf16 state ms | change | bf16 state t/s |\n|---|---:|---:|---:|---:|---:|")
    for config in args.configs.split(","):
        model = load_model(config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
        for batch in (int(b) for b in args.batch.split(",")):
            ms = {torch.float32: [], torch.bfloat16: []}
            for r in range(args.rounds):
                for state in (list(ms) if r % 2 == 0 else list(ms)[::-1]):
                    model.state_dtype = state
                    ms[state].append(run_case(model, BenchCase(batch, n_gen=128), 1)["ms_per_token"])
            a, b = (statistics.median(v) for v in ms.values())
            print(f"| {Path(config).name} | {batch} | {a:.4f} | {b:.4f} | {100 * (b / a - 1):+.1f}% | {batch / b * 1000:,.0f} |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
