"""`mamba generate`: stream a continuation of a prompt, or a batch of prompts as JSONL."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from mamba_core.errors import MambaError, MambaUsageError

from .common import (
    DEFAULT_MODEL,
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

  mamba generate --model tiny-wikitext "The game was"

  echo "The history of" | mamba generate -m state-spaces/mamba-130m-hf -n 64 --temp 0

  mamba generate -m ./mamba-130m-hf --prompts-file prompts.jsonl --temp 0 > out.jsonl

  mamba generate -m tiny-wikitext --json --seed 1 "The game was" | jq .text
"""


def _stdin_is_data() -> bool:
    """True when stdin is a pipe or a file (not a terminal, not /dev/null or a socket)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # no real descriptor (e.g. a test runner): read it
        return sys.stdin is not None and not sys.stdin.isatty()
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _read_stdin() -> str:
    """All of stdin as text; invalid UTF-8 becomes U+FFFD with a warning (never an error)."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    data = stream.read()
    if isinstance(data, str):
        return data
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in data:
        err("Warning: stdin is not valid UTF-8; invalid bytes were replaced with U+FFFD")
    return text


def read_prompt(prompt: Optional[str]) -> str:
    """The prompt: the argument, stdin for '-', or stdin text + newline + argument for a pipe."""
    if prompt == "-":
        return _read_stdin().removesuffix("\n")
    piped = _read_stdin().removesuffix("\n") if _stdin_is_data() else ""
    if piped and prompt:
        return f"{piped}\n{prompt}"
    return piped or prompt or ""


def read_prompts_file(path: Path) -> list[tuple[object, str]]:
    """(id, prompt) pairs from JSONL ({"prompt": ..., "id": ...}) or plain lines (id = line number)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MambaError(f"--prompts-file {path}: cannot read ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and "\ufffd".encode() not in raw:
        err(f"Warning: {path} is not valid UTF-8; invalid bytes were replaced with U+FFFD")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise MambaError(f"--prompts-file {path} holds no prompts")
    is_jsonl = path.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{")
    prompts = []
    for number, line in lines:
        if not is_jsonl:
            prompts.append((number - 1, line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MambaError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be an object with a \"prompt\" string") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise MambaError(f"{path}:{number}: expected an object with a \"prompt\" string")
        prompts.append((row.get("id", len(prompts)), row["prompt"]))
    return prompts


@command
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text; '-' reads stdin. A piped stdin is prepended to it.", show_default=False)] = None,
    model: ModelOpt = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0, help="Tokens to generate at most.")] = 128,
    temp: Annotated[float, typer.Option("--temp", help="Temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Keep the k most likely tokens (0: off).")] = 40,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus: keep the smallest set with this mass, in (0, 1] (1: off).")] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p", help="Drop tokens below min_p x the top probability (0: off).")] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", help="Penalise the last --repeat-last-n tokens (1: off).")] = 1.0,
    repeat_last_n: Annotated[int, typer.Option("--repeat-last-n", min=0, help="Tokens the repeat penalty looks back over.")] = 64,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (reproducible on CPU) (default: random, shown with -v/--json).")] = None,
    stop: Annotated[Optional[List[str]], typer.Option("--stop", help="Stop before this string (repeatable).")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-text token.")] = False,
    echo: Annotated[bool, typer.Option("--echo", help="Print the prompt before the generated text.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, ids, counts, finish_reason, seed, timings).")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option("--prompts-file", help="JSONL ({\"prompt\", \"id\"}) or plain lines; generated as one batch, JSONL out.")] = None,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    device: DeviceOpt = "auto",
    backend: BackendOpt = "auto",
    state_dtype: StateDtypeOpt = "float32",
    verbose: VerboseOpt = False,
) -> None:
    """Generate text with a Mamba model; only the generated text goes to stdout."""
    from mamba_core.generation import Generation
    from mamba_core.sampling import SamplingParams

    from .common import load

    if prompts_file is not None and prompt is not None:
        raise MambaUsageError("give either a PROMPT or --prompts-file, not both")
    if prompts_file is not None and echo:
        raise MambaUsageError("--echo does not apply to --prompts-file (the JSONL rows carry the prompt)")
    sampling = SamplingParams(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)
    batch = read_prompts_file(prompts_file) if prompts_file is not None else None
    text_prompt = None if batch else read_prompt(prompt)
    loaded, tok = load(model, revision, tokenizer, dtype, device, backend, verbose, quantize, state_dtype)
    prompts = [p for _, p in batch] if batch else [text_prompt]
    gen = Generation(loaded.model, tok, prompts, sampling=sampling, max_new_tokens=max_new_tokens, stop=stop or (), ignore_eos=ignore_eos)
    out = sys.stdout
    if batch is None and not json_out:
        if echo:
            out.write(text_prompt)
            out.flush()
        for response in gen:
            if response.text:
                out.write(response.text)
                out.flush()
        out.write("\n")
        out.flush()
    else:
        for _ in gen:
            pass
        if batch is not None:
            for (row_id, row_prompt), result in zip(batch, gen.results):
                out.write(json.dumps({"id": row_id, "prompt": row_prompt, "text": result.text, "prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.token_ids), "finish_reason": result.finish_reason}, ensure_ascii=False) + "\n")
        else:
            result = gen.results[0]
            record = {
                "model": model,
                "text": result.text,
                "prompt_ids": result.prompt_ids,
                "token_ids": result.token_ids,
                "prompt_tokens": len(result.prompt_ids),
                "completion_tokens": len(result.token_ids),
                "finish_reason": result.finish_reason,
                "seed": sampling.seed_used,
                "timings": gen.timings.as_dict(),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    if verbose:
        t = gen.timings.as_dict()
        pre, dec = t["prefill_tokens_per_s"], t["decode_tokens_per_s"]
        err(f"prompt: {t['prompt_tokens']} tokens, prefill {t['prefill_s'] * 1000:.1f} ms ({pre or 0:.1f} t/s)")
        err(f"decode: {t['generated_tokens']} tokens, {t['decode_s'] * 1000:.1f} ms ({dec or 0:.1f} t/s)  seed {sampling.seed_used}")
