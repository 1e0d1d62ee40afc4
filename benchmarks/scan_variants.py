"""Build the CUDA scan with several compile-time settings and compare speed and accuracy.

    python benchmarks/scan_variants.py --variants "split=4;split=8"

A variant sets the kernel's compile-time knobs, key=value for -DMAMBA_SCAN_KEY=value (split: lanes
sharing one channel's n states; threads: per block; chunk: steps staged at once; blocks: per SM that
the registers must allow); each is compiled in parallel as its own extension, then timed on
batch 8 x 2048 x 1536 x 16 (bf16 and fp32), and its final state is checked against the float64
recurrence on the same (rounded) inputs of a smaller shape. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures

import torch

from mamba_core import kernels
from mamba_core.ops.reference import sequential_scan
from scan_microbench import bench


def _defines(variant: str) -> tuple[str, ...]:
    """'split=4,unroll=2' -> ('MAMBA_SCAN_SPLIT=4', 'MAMBA_SCAN_UNROLL=2')."""
    pairs = (item.split("=") for item in variant.split(",") if item)
    return tuple(f"MAMBA_SCAN_{key.strip().upper()}={value.strip()}" for key, value in pairs)


def build(variant: str):
    """The extension module compiled with the variant's settings (cached as `mamba kernels build` caches)."""
    return kernels.build_cuda(defines=_defines(variant))


def _compile(variant: str) -> None:
    build(variant)  # in a worker process: only the build on disk matters


def _inputs(b, length, d, n, dtype, long_memory=False, seed=0):
    """Random scan inputs in float64, rounded to dtype (dt's bias too, as a model of that dtype stores
    it); long_memory: small dt and |A| (decays within 1e-4 of 1), where exp's errors compound most."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.float64).to(dtype).double()  # noqa: E731
    xz, bc, delta = rand(b, length, 2 * d), rand(b, length, 48 + 2 * n), rand(b, length, d)
    A = -torch.rand(d, n, device="cuda", generator=g, dtype=torch.float64) * (1 if long_memory else 8)
    D, bias = rand(d), (rand(d) - (6 if long_memory else 1)).to(dtype).double()
    return xz, delta, bc, A, D, bias


def run(module, b, length, d, n, dtype, time_it: bool, long_memory=False):
    """Microseconds per call, or the final state's error relative to the float64 recurrence."""
    xz, delta, bc, A, D, bias = _inputs(b, length, d, n, dtype, long_memory)
    u, z = xz.to(dtype).chunk(2, dim=-1)
    B, C = bc.to(dtype)[..., 48 : 48 + n], bc.to(dtype)[..., 48 + n :]
    state = torch.zeros(b, d, n, device="cuda")
    call = lambda: module.selective_scan(u, delta.to(dtype), A.float(), B, C, D.float(), z, bias.float(), state.zero_())  # noqa: E731
    if time_it:
        return bench(call)
    call()
    uf, zf = xz.chunk(2, dim=-1)
    _, want = sequential_scan(uf, delta, A, bc[..., 48 : 48 + n], bc[..., 48 + n :], D, zf, bias, torch.zeros(b, d, n, device="cuda", dtype=torch.float64))
    return ((state.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="split=4;split=8", help="';'-separated variants")
    parser.add_argument("--build-only", action="store_true", help="compile (in parallel) and exit")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    with concurrent.futures.ProcessPoolExecutor(len(variants)) as pool:  # compile in parallel, load below
        list(pool.map(_compile, variants))
    if args.build_only:
        return
    print("| variant | bf16 us | fp32 us | state error vs float64: fp32 | bf16 | bf16, long memory |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant in variants:
        module = build(variant)
        bf16, fp32 = (run(module, 8, 2048, 1536, 16, t, True) for t in (torch.bfloat16, torch.float32))
        errors = (run(module, 2, 3000, 256, 16, t, False, long) for t, long in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)))
        print(f"| {variant} | {bf16:.1f} | {fp32:.1f} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
