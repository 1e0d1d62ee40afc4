"""Side by side: transformers' MambaForCausalLM and ours, same random weights, same process.

    python benchmarks/compare_transformers.py --config ../shared/configs/mamba-130m-hf
    python benchmarks/compare_transformers.py --config CFG --tests pp512,tg128 --batch 1 -r 3
    python benchmarks/compare_transformers.py --config CFG --dtype bfloat16 --quantize int8 --batch 1   # ours low precision vs their fp32

Builds transformers' model from config.json with seeded random weights, loads the same tensors
into ours, checks that the logits agree, then times each test for both, interleaved
(theirs, ours, theirs, ours, ...) after one warm-up each, and prints a markdown table with the
ratio ours/theirs. Needs `pip install transformers` (not a dependency of the package).
Tests: ppN (prefill N tokens from an empty state), tgN (N decode steps from a 16-token prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mamba_core.allocator import keep_freed_memory
from mamba_core.cuda_graph import decoder_for


def build(config_path: Path, dtype: torch.dtype, theirs_dtype: torch.dtype, backend: str = "auto", quantize: str = "none"):
    """Both models with identical seeded random weights (ours in `dtype`, optionally int8)."""
    import transformers

    from mamba_core.config import MambaConfig
    from mamba_core.loading import build_model

    transformers.logging.set_verbosity_error()
    data = json.loads((config_path / "config.json").read_text())
    torch.manual_seed(0)
    theirs = transformers.MambaForCausalLM(transformers.MambaConfig(**{k: v for k, v in data.items() if k != "d_inner"})).eval()
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours = build_model(MambaConfig.from_dict(data), state, dtype, torch.device("cpu"), config_path, quantize)
    ours.set_backend(backend)
    theirs.to(theirs_dtype)
    return theirs, ours


def check_logits(theirs, ours, vocab: int) -> tuple[float, float]:
    """Errors of ours and of transformers' own (same dtype) against transformers in float64.

    Random deep models are ill-conditioned (transformers' float32 differs from its float64 by
    ~1e-4 on the 130m shape), so we require ours to be as close to the float64 referee as theirs.
    """
    import copy

    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids).logits.float()
        exact = copy.deepcopy(theirs).double()(ids).logits
    got = ours(ids)
    scale = exact.abs().max()
    return ((got - exact).abs().max() / scale).item(), ((ref - exact).abs().max() / scale).item()


def time_theirs(model, test: str, batch: int, vocab: int) -> float:
    """Seconds for one run of `test` with transformers (its own cache for decode)."""
    n = int(test[2:])
    with torch.no_grad():
        if test.startswith("pp"):
            ids = torch.randint(0, vocab, (batch, n))
            start = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - start
        out = model(torch.randint(0, vocab, (batch, 16)), use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start


def time_ours(model, test: str, batch: int, vocab: int) -> float:
    n = int(test[2:])
    cache = model.make_cache(batch)
    if test.startswith("pp"):
        ids = torch.randint(0, vocab, (batch, n))
        start = time.perf_counter()
        model(ids, cache, logits_to_keep=1)
        return time.perf_counter() - start
    token = model(torch.randint(0, vocab, (batch, 16)), cache, logits_to_keep=1)[:, -1].argmax(-1)
    step = decoder_for(model, cache)  # the one-token step `mamba generate` uses
    start = time.perf_counter()
    for _ in range(n):
        token = step(token).argmax(-1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="directory with a config.json")
    parser.add_argument("--tests", default="pp512,pp2048,tg128")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our dtype")
    parser.add_argument("--theirs-dtype", default=None, choices=["float32", "bfloat16"], help="transformers' dtype (default: --dtype)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"], help="our weight-only quantization")
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=0)
    parser.add_argument("--backend", default="auto", help="our ops backend (auto, torch, cpu-kernels)")
    args = parser.parse_args()
    keep_freed_memory()  # as the CLI does; process-wide, so transformers runs with it too
    if args.threads:
        torch.set_num_threads(args.threads)
    theirs_dtype = args.theirs_dtype or args.dtype
    theirs, ours = build(args.config, getattr(torch, args.dtype), getattr(torch, theirs_dtype), args.backend, args.quantize)
    vocab = ours.config.vocab_size
    ours_err, theirs_err = check_logits(theirs, ours, vocab)
    print(f"logits vs transformers in float64: ours {ours_err:.2e}, transformers' own {theirs_err:.2e} (max |diff| / max |logit|)", file=sys.stderr)
    same_precision = theirs_dtype == args.dtype and args.quantize == "none"
    if same_precision and ours_err > 2 * theirs_err + 1e-5:
        sys.exit("our logits are further from the float64 reference than transformers'; not timing")
    ours_label = args.dtype + ("+int8" if args.quantize == "int8" else "")
    print(f"| test | batch | transformers ({theirs_dtype}) t/s | ours ({ours_label}, {ours.backend}) t/s | ours / transformers |")
    print("|---|---:|---:|---:|---:|")
    for batch in [int(b) for b in args.batch.split(",")]:
        for test in args.tests.split(","):
            tokens = batch * int(test[2:])
            time_theirs(theirs, test, batch, vocab), time_ours(ours, test, batch, vocab)  # warm-up
            t, o = [], []
            for _ in range(args.repetitions):
                t.append(tokens / time_theirs(theirs, test, batch, vocab))
                o.append(tokens / time_ours(ours, test, batch, vocab))
            tm, om = statistics.fmean(t), statistics.fmean(o)
            print(f"| {test} | {batch} | {tm:,.1f} | {om:,.1f} | {om / tm:.2f}x |", flush=True)
    from mamba_core.benchmark import environment

    print("\n_" + ", ".join(f"{k} {v}" for k, v in environment(torch.device("cpu")).items()) + f", {time.strftime('%Y-%m-%d')}_")


if __name__ == "__main__":
    main()
