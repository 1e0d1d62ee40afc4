"""`mamba convert`: between the original, Hugging Face and GGUF formats, in any dtype, safely."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import RevisionOpt, TokenizerOpt, command, err

EXAMPLES = """Examples:

  mamba convert ./mamba-130m ./mamba-130m-hf                      # original layout -> HF

  mamba convert state-spaces/mamba-130m-hf ./m-orig --to orig

  mamba convert ./mamba-130m-hf mamba-130m-q8.gguf --to gguf --gguf-type Q8_0

  mamba convert mamba-130m.gguf ./back-to-hf --dtype bfloat16 --max-shard-size 200MB

  mamba convert ./mamba-130m-hf ./mamba-130m-int8 --quantize int8
"""


@command
def convert(
    src: Annotated[str, typer.Argument(help="Model directory (HF or original layout), hub id, or a .gguf file.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Output directory (hf, orig) or .gguf file.", show_default=False)],
    to: Annotated[str, typer.Option("--to", help="hf, orig or gguf.")] = "hf",
    dtype: Annotated[str, typer.Option("--dtype", help="Storage dtype: float32, bfloat16 or float16 (A_log and D stay float32).")] = "float32",
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", help="GGUF type of the large matrices: F32, F16, BF16 or Q8_0 (default: from --dtype).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Shard HF safetensors above this size.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Reload OUT and compare probe logits with SRC.")] = True,
    keep_fp32: Annotated[str, typer.Option("--keep-fp32", help="Also keep these in float32 when casting: conv, norm (comma list).")] = "",
    quantize: Annotated[str, typer.Option("--quantize", help="none, or int8: store in_proj, out_proj and the embeddings as int8 with per-channel scales (hf only).")] = "none",
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
) -> None:
    """Convert a checkpoint; prints OUT's path as the last line of stdout."""
    from mamba_core.convert import convert as run
    from mamba_core.errors import MambaUsageError
    from mamba_core.gguf_io import GGUF_TYPES

    if gguf_type is not None and (to != "gguf" or gguf_type not in GGUF_TYPES):
        raise MambaUsageError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)} and needs --to gguf")
    run(src, out, to=to, dtype=dtype, force=force, revision=revision, tokenizer=tokenizer, max_shard_size=max_shard_size,
        gguf_type=gguf_type, verify=verify, keep_fp32=tuple(p for p in keep_fp32.split(",") if p), quantize=quantize, report=err)
    print(out, flush=True)
