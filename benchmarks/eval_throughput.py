"""Throughput of exact perplexity evaluation (tokens/s), on the fixture and on a model shape.

    python benchmarks/eval_throughput.py                                   # fixture, whole WikiText-2 test
    python benchmarks/eval_throughput.py --config benchmarks/configs/mamba-130m-hf --limit 8192

With --config, weights are random (seeded) and the GPT-NeoX tokenizer from tests/fixtures is used:
the figure is for speed only. Prints tokens/s and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch

from mamba_core.api import load_tokenizer
from mamba_core.documents import DataFile
from mamba_core.evaluation import Protocol, evaluate, limit_units, make_units
from mamba_core.loading import load_model
from mamba_core.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT / "tests" / "fixtures" / "wikitext-2-raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a config-only model directory (random weights)")
    parser.add_argument("--limit", type=int, default=0, help="score at most this many tokens")
    parser.add_argument("--repeat", type=int, default=1, help="evaluate the text repeated this many times (one document)")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.config:
        loaded = load_model(args.config, backend=args.backend, device=args.device, random_if_no_weights=True)
        tokenizer = Tokenizer(ROOT / "tests" / "fixtures" / "gpt-neox-20b-tokenizer" / "tokenizer.json", 0, 0)
    else:
        loaded = load_model("tiny-wikitext", backend=args.backend, device=args.device)
        tokenizer = load_tokenizer(loaded)
    data = WIKI
    if args.repeat > 1:
        data = Path(tempfile.mkdtemp()) / "repeated.txt"
        data.write_text(WIKI.read_text(encoding="utf-8") * args.repeat, encoding="utf-8")
    units = make_units(Protocol("exact"), tokenizer, [DataFile(str(data))])
    if args.limit:
        units = limit_units(units, args.limit)
    result = evaluate(loaded.model, units, 1, chunk_size=args.chunk_size)
    report = result.total.report()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {args.config or 'tiny-wikitext'} backend {loaded.model.backend} threads {torch.get_num_threads()}: "
          f"{result.tokens_processed:,} tokens in {result.seconds:.1f} s = {result.tokens_processed / result.seconds:,.0f} tokens/s, "
          f"ppl {report['ppl']:.2f}, peak RSS {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
