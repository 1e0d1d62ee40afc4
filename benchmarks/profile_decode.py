"""Where a decode step's (or a prompt's) GPU time goes: kernels per step and the top kernels by time (torch.profiler).

    python benchmarks/profile_decode.py --config benchmarks/configs/mamba-130m-hf --batch 1,64
    python benchmarks/profile_decode.py --config benchmarks/configs/mamba-130m-hf --batch 8 --prompt 2048

Random weights, bf16, the model's default backend, 20 profiled steps after 5 warm-up steps (plain
launches, not the CUDA graph: the kernels are the same, the launch gaps are not); with --prompt N,
3 profiled prefills of N tokens per sequence instead.
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
    parser.add_argument("--prompt", type=int, default=1, help="tokens per step (1: decode steps; N > 1: prefills of N tokens)")
    args = parser.parse_args()
    model = load_model(args.config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
    steps = args.steps if args.prompt == 1 else 3
    for batch in (int(b) for b in args.batch.split(",")):
        cache = model.make_cache(batch)
        token = torch.zeros(batch, args.prompt, dtype=torch.long, device="cuda")
        for _ in range(5):
            model(token, cache, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(token, cache, logits_to_keep=1)
            torch.cuda.synchronize()
        totals, counts = collections.Counter(), collections.Counter()
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                counts[event.name] += 1
        per_step = sum(counts.values()) / steps
        busy = sum(totals.values()) / steps
        print(f"\n### batch {batch} x {args.prompt} tokens: {per_step:.0f} kernels per step, {busy:.0f} us of kernel time per step ({model.backend})\n")
        print("| kernel | per step | us per step |")
        print("|---|---:|---:|")
        for name, total in totals.most_common(12):
            print(f"| {name[:90]} | {counts[name] / steps:.0f} | {total / steps:.1f} |")


if __name__ == "__main__":
    main()
