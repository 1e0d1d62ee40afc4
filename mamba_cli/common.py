"""What every command shares: option types, error handling and exit codes, stderr reporting.

Exit codes: 0 ok, 1 error, 2 usage, 3 a CI gate failed, 130 interrupted. stdout carries only the
result; messages go to stderr, with colour only when stderr is a terminal.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
import warnings
from typing import Annotated, Callable, Optional

import typer

from mamba_core.allocator import keep_freed_memory
from mamba_core.errors import MambaError, MambaUsageError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", envvar="MAMBA_MODEL", help="Local directory (HF or state-spaces layout), hub id, or 'tiny-wikitext' (embedded)."),
]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")]
TokenizerOpt = Annotated[
    Optional[str], typer.Option("--tokenizer", help="tokenizer.json, a directory holding one, or a hub id (default: the model's own, else EleutherAI/gpt-neox-20b).")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BackendOpt = Annotated[str, typer.Option("--backend", help="Ops backend: auto, or torch (the plain-torch reference).")]
QuantizeOpt = Annotated[
    str, typer.Option("--quantize", help="none, or int8: weight-only int8 (per-channel scales) for in_proj, out_proj and the embeddings/head.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print load time, token counts and speeds to stderr.")]
StateDtypeOpt = Annotated[
    str, typer.Option("--state-dtype", help="The SSM state's dtype in the cache: float32, or model (the model dtype: half the bytes per decoded token).")
]
DEFAULT_MODEL = "state-spaces/mamba-130m-hf"


def err(message: str) -> None:
    """One line to stderr."""
    print(message, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err(f"Warning: {message}")


def _stdout_gone() -> None:
    """The reader of stdout went away (`| head`): silence further writes, including at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def command(func: Callable) -> Callable:
    """Wrap a command: errors become one line and an exit code, Ctrl-C exits 130, EPIPE is quiet."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        keep_freed_memory()  # CPU prompts: no page faults for every freed activation (see mamba_core/allocator.py)
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except MambaError as exc:
            if os.environ.get("MAMBA_DEBUG") == "1":
                traceback.print_exc()
            err(f"Error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            sys.stdout.flush()
            err("Interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            _stdout_gone()
            raise typer.Exit(EXIT_OK) from None
        except Exception as exc:  # out of memory, or anything unforeseen: one line unless debugging
            if os.environ.get("MAMBA_DEBUG") == "1":
                traceback.print_exc()
            elif _is_out_of_memory(exc):
                err(f"Error: out of memory{_allocation(exc)}; try a smaller --batch-size or --chunk-size, a shorter prompt, or a lower-precision --dtype")
            else:
                first = (str(exc).strip().splitlines() or [""])[0]
                err(f"Error: {type(exc).__name__}: {first} (set MAMBA_DEBUG=1 for a traceback)")
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper


def _is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def _allocation(exc: BaseException) -> str:
    """' (tried to allocate 20.00 GiB ...)' from torch's OOM message, when it says."""
    import re

    match = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", str(exc))
    return f" (tried to allocate {match.group(1)})" if match else ""


class Stopwatch:
    """time.perf_counter() differences, for -v reports."""

    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def check_state_dtype(name: str) -> None:
    """--state-dtype must be float32 or model (a usage error, before any model is loaded)."""
    if name not in ("float32", "model"):
        raise MambaUsageError(f"--state-dtype {name!r}: choose float32 or model")


def set_state_dtype(model, name: str) -> None:
    """Apply --state-dtype (checked by `check_state_dtype` before loading) to a loaded model: float32
    (the default) or model (its own dtype)."""
    import torch

    model.state_dtype = model.dtype if name == "model" else torch.float32


def load(model: str, revision, tokenizer, dtype: str, device: str, backend: str, verbose: bool, quantize: str = "none",
         state_dtype: str = "float32"):
    """Load model and tokenizer for a command; with -v, say what was loaded and how long it took."""
    from mamba_core.api import load_tokenizer
    from mamba_core.loading import load_model

    check_state_dtype(state_dtype)
    threads = os.environ.get("MAMBA_NUM_THREADS")
    if threads:
        import torch

        if not threads.isdigit() or int(threads) < 1:
            raise MambaUsageError(f"MAMBA_NUM_THREADS={threads!r} must be a positive integer")
        torch.set_num_threads(int(threads))
    watch = Stopwatch()
    loaded = load_model(model, dtype=dtype, device=device, revision=revision, backend=backend, quantize=quantize)
    set_state_dtype(loaded.model, state_dtype)
    tok = load_tokenizer(loaded, tokenizer)
    if verbose:
        m = loaded.model
        err(
            f"load: {watch.lap():.2f} s  model {model} ({loaded.layout} layout, {m.num_parameters():,} params) "
            f"dtype {str(m.dtype).replace('torch.', '')}{' weights int8' if m.quantization else ''} device {m.device} backend {m.backend}"
        )
    return loaded, tok
