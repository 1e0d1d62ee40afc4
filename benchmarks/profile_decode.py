"""Where a decode step's GPU time goes: kernels per step and the top kernels by time (torch.profiler).

    python benchmarks/profile_decode.py --config benchmarks/configs/mamba-130m-hf --batch 1,64

Random weights, bf16, the model's default backend, 20 profiled steps after 5 warm-up steps (plain
launches, not the CUDA graph: the kernels are the same, the launch gaps are not).
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_core.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/mamba-130m-hf")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = load_model(args.config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
    for batch in (int(b) for b in args.batch.split(",")):
        cache = model.make_cache(batch)
        token = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
        for _ in range(5):
            model(token, cache, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                model(token, cache, logits_to_keep=1)
            torch.cuda.synchronize()
        totals, counts = collections.Counter(), collections.Counter()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                counts[event.name] += 1
        per_step = sum(counts.values()) / args.steps
        busy = sum(totals.values()) / args.steps
        print(f"\n### batch {batch}: {per_step:.0f} kernels per step, {busy:.0f} us of kernel time per step ({model.backend})\n")
        print("| kernel | per step | us per step |")
        print("|---|---:|---:|")
        for name, total in totals.most_common(12):
            print(f"| {name[:90]} | {counts[name] / args.steps:.0f} | {total / args.steps:.1f} |")


if __name__ == "__main__":
    main()
