"""Products of a few rows (decoding a batch): our tensor-core kernel (rows_gemm) against cuBLAS.

    python benchmarks/gemm_microbench.py [--rows 2,8,64]

Each product is captured 20 times in a row into a CUDA graph (as in decoding, where products follow
each other; ours may start early and stage its weights while the previous one runs) and the graph
replayed; the table gives microseconds per product and the weights' GB/s. bf16, an H200 in mind
(sm_90+); the shapes are the projections of the 130m, 1.4b and 2.8b models.

The 20 calls read one weight, which then stays in L2 (60 MiB on an H200); in a decoded token every
layer's weights come from DRAM. `--cold` captures one call per copy of the weight, with enough
copies to fill twice the L2, as a model's layers do.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from mamba_core.kernels import cuda_backend

SHAPES = {  # name: (n, k) of the weight
    "130m in_proj": (3072, 768), "130m x_proj": (80, 1536), "130m out_proj": (768, 1536), "130m lm_head": (50280, 768),
    "1.4b in_proj": (8192, 2048), "1.4b x_proj": (160, 4096), "1.4b out_proj": (2048, 4096),
    "2.8b in_proj": (10240, 2560), "2.8b x_proj": (192, 5120), "2.8b out_proj": (2560, 5120),
}
CALLS = 20


def time_graph(fn, replays: int = 50, calls: int = CALLS) -> float:
    """Microseconds per call of fn, from a CUDA graph of `calls` calls replayed `replays` times."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * calls)


def copies(w: torch.Tensor, cold: bool) -> list[torch.Tensor]:
    """w alone, or (cold) w and clones of it filling twice the L2 (at least CALLS in all)."""
    if not cold:
        return [w]
    l2 = torch.cuda.get_device_properties(w.device).L2_cache_size
    return [w] + [w.clone() for _ in range(max(CALLS, -(-2 * l2 // (w.numel() * w.element_size()))) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2,8,64")
    parser.add_argument("--splits", default="0,2,4,8", help="blocks per cluster to try (0: the kernel's own choice)")
    parser.add_argument("--cols", default="64", help="output columns per cluster to try (64, 16)")
    parser.add_argument("--only", default="", help="products whose name contains this")
    parser.add_argument("--cold", action="store_true", help="weights from DRAM: a copy per call, twice the L2 in all")
    args = parser.parse_args()
    module = cuda_backend("cuda").module
    variants = [(int(s), int(c)) for c in args.cols.split(",") for s in args.splits.split(",")]
    heads = " | ".join(f"ours s={s or 'auto'} c={c} us" for s, c in variants)
    print(f"| product | rows | cuBLAS us | {heads} | ours GB/s | max rel. difference |")
    print("|---|---:|---:|" + "---:|" * (len(variants) + 2))
    for name, (n, k) in SHAPES.items():
        if args.only not in name:
            continue
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        ws = copies(w, args.cold)
        calls = max(CALLS, len(ws))

        def timed(product) -> float:
            """time_graph of product(x, weight) over the copies in turn."""
            turn = itertools.cycle(ws)
            return time_graph(lambda: product(next(turn)), calls=calls)

        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, 1, k, device="cuda", dtype=torch.bfloat16)
            ref, ours = F.linear(x, w), module.rows_gemm(x, w, None, *variants[0])
            diff = ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            times = []
            for s, c in variants:
                slice_ = -(-k // s + 63) // 64 * 64 if s else 0  # shared memory for the slices of x and w (gemm_smem)
                fits = s == 0 or (16 * -(-rows // 16) + c) * (slice_ + 8) * 2 + 2 * 16 * -(-rows // 16) * c * 4 <= 227 * 1024
                times.append(timed(lambda wi: module.rows_gemm(x, wi, None, s, c)) if fits else float("nan"))  # noqa: B023
            t_cublas = timed(lambda wi: F.linear(x, wi))  # noqa: B023
            cells = " | ".join(f"{t:.2f}" for t in times)
            print(f"| {name} | {rows} | {t_cublas:.2f} | {cells} | {n * k * 2 / times[0] / 1e3:,.0f} | {diff:.1e} |", flush=True)

if __name__ == "__main__":
    main()
