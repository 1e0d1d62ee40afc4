"""Build the CUDA scan with several threads-per-channel splits and compare speed and accuracy.

    python benchmarks/scan_variants.py --splits 4,8,16

Each split (threads sharing one channel's n states) is compiled in parallel as its own extension
(-DMAMBA_SCAN_SPLIT=s); then each is timed on batch 8 x 2048 x 1536 x 16 (bf16 and fp32) and
checked against the float64 recurrence on a smaller shape. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
from pathlib import Path

import torch

from mamba_core.ops.reference import sequential_scan
from scan_microbench import bench

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda"


def build(split: int):
    """The extension module compiled with MAMBA_SCAN_SPLIT=split (cached under $MAMBA_KERNEL_CACHE)."""
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    directory = Path(os.environ.get("MAMBA_KERNEL_CACHE", "/tmp/mamba-kernels")) / f"scan_split{split}"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=f"mamba_scan_split{split}", sources=[str(CSRC / "mamba_cuda.cu")], build_directory=str(directory),
                              extra_cuda_cflags=["-O3", "-std=c++17", f"-DMAMBA_SCAN_SPLIT={split}"], verbose=False)


def _compile(split: int) -> None:
    build(split)  # in a worker process: only the build on disk matters


def _inputs(b, length, d, n, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xz = torch.randn(b, length, 2 * d, device="cuda", generator=g, dtype=torch.float64)
    bc = torch.randn(b, length, 48 + 2 * n, device="cuda", generator=g, dtype=torch.float64)
    delta = torch.randn(b, length, d, device="cuda", generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, device="cuda", generator=g, dtype=torch.float64) * 8
    D, bias = torch.randn(d, device="cuda", dtype=torch.float64), torch.randn(d, device="cuda", dtype=torch.float64) - 1
    return xz, delta, bc, A, D, bias


def run(module, b, length, d, n, dtype, time_it: bool):
    xz, delta, bc, A, D, bias = _inputs(b, length, d, n, dtype)
    u, z = xz.to(dtype).chunk(2, dim=-1)
    B, C = bc.to(dtype)[..., 48 : 48 + n], bc.to(dtype)[..., 48 + n :]
    state = torch.zeros(b, d, n, device="cuda")
    call = lambda: module.selective_scan(u, delta.to(dtype), A.float(), B, C, D.float(), z, bias.float(), state.zero_())  # noqa: E731
    if time_it:
        return bench(call)
    y = call()
    uf, zf = xz.chunk(2, dim=-1)
    want, _ = sequential_scan(uf, delta, A, bc[..., 48 : 48 + n], bc[..., 48 + n :], D, zf, bias, torch.zeros(b, d, n, device="cuda", dtype=torch.float64))
    return ((y.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="4,8,16")
    parser.add_argument("--build-only", action="store_true", help="compile (in parallel) and exit")
    args = parser.parse_args()
    splits = [int(s) for s in args.splits.split(",")]
    with concurrent.futures.ProcessPoolExecutor(len(splits)) as pool:  # compile in parallel, load below
        list(pool.map(_compile, splits))
    if args.build_only:
        return
    print("| threads per channel | bf16 us | fp32 us | fp32 rel. error vs float64 (2 x 3000 x 256 x 16) |")
    print("|---:|---:|---:|---:|")
    for split in splits:
        module = build(split)
        bf16, fp32 = (run(module, 8, 2048, 1536, 16, t, True) for t in (torch.bfloat16, torch.float32))
        err = run(module, 2, 3000, 256, 16, torch.float32, False)
        print(f"| {split} | {bf16:.1f} | {fp32:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
