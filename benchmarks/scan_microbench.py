"""Time the CUDA selective-scan kernel alone: batch 8, inner 1536, state 16, length 2048.

Floor (H200): inputs u, delta, z (b, l, d) + B, C (b, l, n) in bf16 and y out: about 4 x 25 MB = 100 MB
-> ~25 us at 4 TB/s; 403 M exp2 at 16 per clock per SM x 132 SMs x 1.98 GHz -> ~96 us.
"""

from __future__ import annotations

import torch

from mamba_core.kernels import cuda_backend
from mamba_core.ops.reference import TorchOps


def bench(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1000  # microseconds


def main() -> None:
    ops = cuda_backend("cuda")
    b, length, d, n = 8, 2048, 1536, 16
    print("| dtype | kernel us | torch reference us | exps/s (T) |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device="cuda").manual_seed(0)
        xz = torch.randn(b, length, 2 * d, device="cuda", generator=g).to(dtype)
        u, z = xz.chunk(2, dim=-1)
        delta = torch.randn(b, length, d, device="cuda", generator=g).to(dtype)
        bc = torch.randn(b, length, 48 + 2 * n, device="cuda", generator=g).to(dtype)
        B, C = bc[..., 48 : 48 + n], bc[..., 48 + n :]
        A = -torch.rand(d, n, device="cuda", generator=g) * 8
        D, bias = torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
        state = torch.zeros(b, d, n, device="cuda")
        kernel_us = bench(lambda: ops.selective_scan(u, delta, A, B, C, D, z, bias, state))
        torch_us = bench(lambda: TorchOps().selective_scan(u, delta, A, B, C, D, z, bias, state), reps=3)
        print(f"| {str(dtype).replace('torch.', '')} | {kernel_us:.1f} | {torch_us:.1f} | {b * length * d * n / kernel_us / 1e6:.2f} |")


if __name__ == "__main__":
    main()
