"""Accuracy of each scan implementation against float64, on the same inputs (diagnostics).

    python benchmarks/scan_accuracy.py          # prints max |err| / max |ref| for y and the state
"""

from __future__ import annotations

import torch

from mamba_core.ops.reference import TorchOps, sequential_scan


def main() -> None:
    backends = [("torch", "cpu", TorchOps())]
    try:
        from mamba_core.kernels import cpu_backend

        backends.append(("cpu-kernels", "cpu", cpu_backend("cpu")))
    except RuntimeError:
        pass
    if torch.cuda.is_available():
        from mamba_core.kernels import cuda_backend

        backends.append(("cuda-kernels", "cuda", cuda_backend("cuda")))
    for b, length, d, n in [(16, 4097, 96, 16), (2, 2048, 40, 40), (1, 4097, 64, 16)]:
        g = torch.Generator().manual_seed(length + b)
        kw = dict(generator=g, dtype=torch.float64)
        xz, delta, bc = torch.randn(b, length, 2 * d, **kw), torch.randn(b, length, d, **kw), torch.randn(b, length, 3 + 2 * n, **kw)
        A, D, bias, h0 = -torch.rand(d, n, **kw) * 8, torch.randn(d, **kw), torch.randn(d, **kw) - 1, torch.randn(b, d, n, **kw)
        u, z = xz.chunk(2, dim=-1)
        B, C = bc[..., 3 : 3 + n], bc[..., 3 + n :]
        y_ref, h_ref = sequential_scan(u, delta, A, B, C, D, z, bias, h0)
        for name, device, ops in backends:
            f = lambda t: t.float().to(device)  # noqa: E731
            xz32 = f(xz)
            u32, z32 = xz32.chunk(2, dim=-1)
            bc32 = f(bc)
            state = f(h0).contiguous()
            y = ops.selective_scan(u32, f(delta), f(A), bc32[..., 3 : 3 + n], bc32[..., 3 + n :], f(D), z32, f(bias), state)
            err_y = ((y.double().cpu() - y_ref).abs().max() / y_ref.abs().max()).item()
            err_h = ((state.double().cpu() - h_ref).abs().max() / h_ref.abs().max()).item()
            print(f"b={b} l={length} d={d} n={n} {name:<13} y {err_y:.2e}  state {err_h:.2e}")


if __name__ == "__main__":
    main()
