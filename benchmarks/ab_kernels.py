"""A/B versions of the CUDA kernels in one process: decode speed with each, runs alternating.

    mkdir -p ab_old && git archive HEAD~1 csrc | tar -x -C ab_old    # the "before" sources
    python benchmarks/ab_kernels.py --old ab_old/csrc --configs benchmarks/configs/mamba-130m-hf --batch 1,64

Every build (the --old source trees, then this checkout's) drives the same model (random weights,
bf16) through `model.use_ops`, and each case runs as `mamba bench` runs it (CUDA graphs, 128 tokens
per repetition), the builds alternating `--rounds` times in a rotating order, so that a drift of
the machine shows up in every column instead of as a difference. The change is the last column against the first.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from mamba_core import kernels
from mamba_core.benchmark import BenchCase, run_case
from mamba_core.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, nargs="+", required=True, help="other csrc/ directories")
    parser.add_argument("--configs", default="benchmarks/configs/mamba-130m-hf", help="comma-separated model directories")
    parser.add_argument("--batch", default="1,8,64")
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    clusters = torch.cuda.get_device_capability()[0] >= 9
    builds = {str(old): kernels.CudaKernelOps(kernels.build_cuda(old), clusters) for old in args.old}
    builds["this checkout"] = kernels.CudaKernelOps(kernels.load_cuda(), clusters)
    print("| model | batch | " + " | ".join(f"{name} ms/token" for name in builds) + " | change |")
    print("|---|---:|" + "---:|" * (len(builds) + 1))
    for config in args.configs.split(","):
        model = load_model(config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
        for batch in (int(b) for b in args.batch.split(",")):
            ms = {name: [] for name in builds}
            order = list(builds.items())
            for r in range(args.rounds):
                for name, ops in order[r % len(order):] + order[: r % len(order)]:  # rotated: no build always runs first
                    model.use_ops(ops)
                    ms[name].append(run_case(model, BenchCase(batch, n_gen=args.gen), 1)["ms_per_token"])
            medians = [statistics.median(times) for times in ms.values()]
            cells = " | ".join(f"{m:.3f}" for m in medians)
            print(f"| {Path(config).name} | {batch} | {cells} | {100 * (medians[-1] / medians[0] - 1):+.1f}% |", flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
