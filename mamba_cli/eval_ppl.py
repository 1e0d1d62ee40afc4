"""`mamba eval-ppl`: exact perplexity of documents, with the statistics people compare, and CI gates."""

from __future__ import annotations

import json
import sys
from typing import Annotated, List, Optional

import typer

from mamba_core.errors import MambaUsageError

from .common import (
    DEFAULT_MODEL,
    EXIT_GATE,
    BackendOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuantizeOpt,
    RevisionOpt,
    StateDtypeOpt,
    TokenizerOpt,
    VerboseOpt,
    command,
    err,
)

EXAMPLES = """Examples:

  mamba eval-ppl -m tiny-wikitext --data wiki.test.raw

  mamba eval-ppl -m tiny-wikitext --data wiki.test.raw --window 1024 --json

  mamba eval-ppl -m ./mamba-130m-hf --data wiki.test.raw --llama-cpp-compat --ctx 512

  mamba eval-ppl -m tiny-wikitext --data docs.jsonl --limit-tokens 20000 --max-ppl 250

  mamba eval-ppl -m tiny-wikitext --dtype bfloat16 --kl-base tiny-wikitext --data wiki.test.raw --max-kl 0.01
"""


def _progress(total: int):
    """A progress bar over the text's bytes on stderr when it is a terminal; else nothing (None)."""
    if not sys.stderr.isatty():
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("eval"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task("eval", total=total)
    return bar, lambda n: bar.advance(task, n)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_human(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    print(f"PPL = {report['ppl']:.2f} +/- {report['ppl_stderr']:.2f}", flush=True)
    table = Table(box=None, pad_edge=False)
    for column in ("data", "tokens", "nll mean", "bits/byte", "byte ppl", "word ppl", "ppl"):
        table.add_column(column, justify="left" if column == "data" else "right")
    rows = report["files"] + ([dict(report, path="total")] if len(report["files"]) > 1 else [])
    for r in rows:
        table.add_row(r["path"], f"{r['tokens_scored']:,}", f"{r['nll_mean']:.4f}", _fmt(r["bits_per_byte"], ".4f"), _fmt(r["byte_ppl"], ".4f"), _fmt(r["word_ppl"], ".2f"), f"{r['ppl']:.2f}")
    console = Console(file=sys.stdout, width=120)
    console.print(table)
    protocol = report["protocol"]
    params = " ".join(f"{k}={v}" for k, v in protocol["params"].items() if v is not None)
    console.print(f"{report['tokens_per_s']:,.0f} tokens/s  protocol {protocol['name']} {params}  dtype {report['dtype']}  backend {report['backend']}", highlight=False)
    if "kl" in report:
        kl = report["kl"]
        console.print(f"KL(base || model): mean {kl['kl_mean']:.6f}  p99 {kl['kl_p99']:.6f}  max {kl['kl_max']:.6f}  top-1 agreement {kl['top1_agreement'] * 100:.2f}%", highlight=False)


@command
def eval_ppl(
    data: Annotated[List[str], typer.Option("--data", "-f", help=".txt (one document), .jsonl (one per line) or - (stdin); repeatable.")],
    model: ModelOpt = DEFAULT_MODEL,
    text_field: Annotated[str, typer.Option("--text-field", help="JSONL field holding the text.")] = "text",
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Tokens per forward; the state is carried between chunks.")] = 2048,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Documents or windows evaluated together.")] = 1,
    window: Annotated[Optional[int], typer.Option("--window", min=2, help="Score consecutive windows of N tokens, each from a fresh state.")] = None,
    llama_cpp_compat: Annotated[bool, typer.Option("--llama-cpp-compat", help="llama.cpp's llama-perplexity protocol (needs --ctx).")] = False,
    ctx: Annotated[Optional[int], typer.Option("--ctx", min=4, help="Context N for --llama-cpp-compat.")] = None,
    chunks: Annotated[int, typer.Option("--chunks", min=0, help="With --llama-cpp-compat: at most K chunks per file (0: all).")] = 0,
    no_bos: Annotated[bool, typer.Option("--no-bos", help="Do not prefix BOS; score from each document's second token.")] = False,
    limit_tokens: Annotated[Optional[int], typer.Option("--limit-tokens", min=1, help="Stop after N scored tokens.")] = None,
    max_ppl: Annotated[Optional[float], typer.Option("--max-ppl", help="CI gate: exit 3 if ppl > X.")] = None,
    expect_ppl: Annotated[Optional[float], typer.Option("--expect-ppl", help="CI gate: exit 3 if |ppl - X| / X > --rtol.")] = None,
    rtol: Annotated[float, typer.Option("--rtol", min=0.0, help="Relative tolerance for --expect-ppl.")] = 0.01,
    kl_base: Annotated[Optional[str], typer.Option("--kl-base", help="Also run this model and report KL(base || model) per token.")] = None,
    kl_base_dtype: Annotated[str, typer.Option("--kl-base-dtype", help="dtype of the --kl-base model.")] = "float32",
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="CI gate (with --kl-base): exit 3 if the mean KL > X.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the summary and table.")] = False,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    state_dtype: StateDtypeOpt = "float32",
    verbose: VerboseOpt = False,
) -> None:
    """Perplexity of a model on text: exact by default (every token with all text before it)."""
    from mamba_core.documents import read_data_file
    from mamba_core.evaluation import Protocol, evaluate, limit_units, make_units
    from mamba_core.loading import load_model

    from .common import load

    if llama_cpp_compat and window is not None:
        raise MambaUsageError("--window and --llama-cpp-compat are different protocols; choose one")
    if llama_cpp_compat and ctx is None:
        raise MambaUsageError("--llama-cpp-compat needs --ctx N (llama-perplexity's -c)")
    if ctx is not None and not llama_cpp_compat:
        raise MambaUsageError("--ctx applies only to --llama-cpp-compat (use --window N for windows)")
    if max_kl is not None and kl_base is None:
        raise MambaUsageError("--max-kl needs --kl-base")
    if data.count("-") > 1:
        raise MambaUsageError("--data - (stdin) can be given only once")
    if llama_cpp_compat:
        protocol = Protocol("llama-cpp", ctx, chunks, bos=False)
    else:
        protocol = Protocol("window" if window else "exact", window or 0, bos=not no_bos)
    files = [read_data_file(name, text_field) for name in data]
    loaded, tok = load(model, revision, tokenizer, dtype, device, backend, verbose, quantize, state_dtype)
    base = load_model(kl_base, dtype=kl_base_dtype, device=loaded.model.device, backend=backend).model if kl_base else None
    units = make_units(protocol, tok, files)
    if limit_tokens:
        units = limit_units(units, limit_tokens)
    bar, advance = _progress(sum(f.text_bytes for f in files))
    if bar is not None:
        bar.start()
    try:
        result = evaluate(loaded.model, units, len(files), chunk_size=chunk_size, batch_size=batch_size, base=base, progress=advance)
    finally:
        if bar is not None:
            bar.stop()
    if not result.total.tokens:
        raise MambaUsageError("nothing to score: the data is shorter than one unit (try a smaller --ctx or --window)")
    report = {
        "model": {"name": model, "path": str(loaded.path), "revision": revision},
        "data": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes, "documents": f.documents, "words": f.words} for f in files],
        "protocol": {"name": protocol.name, "params": {**protocol.params(), "chunk_size": chunk_size, "batch_size": batch_size, "limit_tokens": limit_tokens}},
        **result.total.report(),
        "tokens_processed": result.tokens_processed,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_processed / result.seconds if result.seconds else 0.0,
        "dtype": str(loaded.model.dtype).replace("torch.", ""),
        "backend": loaded.model.backend,
        "files": [{"path": f.path, **s.report()} for f, s in zip(files, result.files)],
    }
    if result.kl is not None:
        report["kl"] = {"base": kl_base, "base_dtype": kl_base_dtype, **result.kl.report()}
    if json_out:
        print(json.dumps(report), flush=True)
    else:
        _print_human(report)
    if verbose:
        err(f"eval: {result.tokens_processed:,} tokens processed in {result.seconds:.2f} s ({report['tokens_per_s']:,.0f} t/s)")
    _gates(report, max_ppl, expect_ppl, rtol, max_kl)


def _gates(report: dict, max_ppl, expect_ppl, rtol, max_kl) -> None:
    """Exit 3 with a one-line reason when a CI gate fails."""
    ppl = report["ppl"]
    reason = None
    if max_ppl is not None and ppl > max_ppl:
        reason = f"ppl {ppl:.4f} > --max-ppl {max_ppl}"
    elif expect_ppl is not None and abs(ppl - expect_ppl) / expect_ppl > rtol:
        reason = f"ppl {ppl:.4f} differs from --expect-ppl {expect_ppl} by {abs(ppl - expect_ppl) / expect_ppl:.2e} relative (> --rtol {rtol})"
    elif max_kl is not None and report["kl"]["kl_mean"] > max_kl:
        reason = f"mean KL {report['kl']['kl_mean']:.6f} > --max-kl {max_kl}"
    if reason:
        err(f"Gate failed: {reason}")
        raise typer.Exit(EXIT_GATE)
