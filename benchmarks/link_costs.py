"""What one kernel of the decode chain costs: a step with x_proj's or out_proj's product left out.

    python benchmarks/link_costs.py --config benchmarks/configs/mamba-130m-hf --batch 1,64

Timing only, the numerics are wrong on purpose: zeros stand in for x_proj's output and the scan
step's first h channels for out_proj's, so that every other kernel runs as before. Each variant is
run as `mamba bench` runs it (CUDA graph, 128 tokens), in rotating order for `--rounds` rounds;
the difference to "all kernels" bounds what fusing that product away could save.
"""

from __future__ import annotations

import argparse
import statistics
import types

import torch

from mamba_core.benchmark import BenchCase, run_case
from mamba_core.loading import load_model

VARIANTS = {"all kernels": (False, False), "no x_proj": (True, False), "no out_proj": (False, True), "neither": (True, True)}


def mixer_tail(skip_x: bool, skip_out: bool):
    """The ops' mixer_tail (x_proj, scan step, out_proj) with the chosen products left out."""
    zeros = {}

    def tail(self, w, x, z, ssm_state):
        rank, n = w.dt_w.shape[1], w.A.shape[1]
        if skip_x:
            low = zeros.setdefault(x.shape[0], torch.zeros(x.shape[0], 1, rank + 2 * n, dtype=x.dtype, device=x.device))
        else:
            low = self.linear(x, w.x_w)  # (b, 1, rank + 2n)
        dt, B, C = low.split([rank, n, n], dim=-1)
        y = self.decode_step(x, dt, w.dt_w, w.A, B, C, w.D, z, w.dt_b, ssm_state)  # (b, 1, d)
        return y[..., : w.out_w.shape[0]] if skip_out else self.linear(y, w.out_w, w.out_b, w.out_scale)

    return tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="benchmarks/configs/mamba-130m-hf")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args.config, dtype="bfloat16", device="cuda", random_if_no_weights=True).model
    names = list(VARIANTS)
    print("| batch | " + " | ".join(f"{name} ms/token" for name in names) + " |")
    print("|---:|" + "---:|" * len(names))
    for batch in (int(b) for b in args.batch.split(",")):
        ms = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                model.ops.mixer_tail = types.MethodType(mixer_tail(*VARIANTS[name]), model.ops)
                ms[name].append(run_case(model, BenchCase(batch, n_gen=128), 1)["ms_per_token"])
        print(f"| {batch} | " + " | ".join(f"{statistics.median(ms[name]):.4f}" for name in names) + " |", flush=True)
    del model.ops.mixer_tail


if __name__ == "__main__":
    main()
