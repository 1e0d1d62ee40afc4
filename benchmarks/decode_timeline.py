"""The kernels of one replay of the greedy decoding graph, with start and end times: where a step's
wall time goes when its kernels overlap (launched early) and what sits between them.

    python benchmarks/decode_timeline.py --config benchmarks/configs/mamba-130m-hf --batch 1

Random weights, bf16, the graph `mamba generate --temp 0` and `mamba bench` decode with
(`sampling_step` with a greedy sampler), 20 warm-up steps, then 5 profiled replays; prints the
first and last `--show` kernels of the third (microseconds from its first kernel's start) and
where the next replay starts.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mamba_core.cuda_graph import sampling_step
from mamba_core.loading import load_model
from mamba_core.sampling import Sampler, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/mamba-130m-hf")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--show", type=int, default=8, help="kernels shown at each end of the replay")
    args = parser.parse_args()
    model = load_model(args.config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
    cache = model.make_cache(args.batch)
    model(torch.zeros(args.batch, 8, dtype=torch.long, device="cuda"), cache, logits_to_keep=1)
    step = sampling_step(model, cache, Sampler(SamplingParams(temperature=0.0), model.config.vocab_size))
    token = torch.zeros(args.batch, dtype=torch.long, device="cuda")
    for _ in range(20):
        token = step(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            token = step(token)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    per_replay = len(kernels) // 5
    replay = kernels[2 * per_replay : 3 * per_replay + 1]  # the third, and the next one's first kernel
    t0 = replay[0].time_range.start
    print(f"{per_replay} kernels per replay; first start to last end {replay[-2].time_range.end - t0:.1f} us; "
          f"the next replay starts at {replay[-1].time_range.start - t0:.1f} us")
    print("| # | start us | end us | us | kernel |\n|---:|---:|---:|---:|---|")
    for i, e in enumerate(replay):
        if i < args.show or i >= len(replay) - args.show:
            print(f"| {i} | {e.time_range.start - t0:.1f} | {e.time_range.end - t0:.1f} | {e.time_range.elapsed_us():.1f} | {e.name[:80]} |")


if __name__ == "__main__":
    main()
