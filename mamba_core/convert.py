"""Converting checkpoints between the HF, original state-spaces and GGUF layouts, safely.

Output is written into a temporary sibling of OUT and renamed into place only after it has been
reloaded and its logits on a fixed probe compared with the source's, so an interrupted, failed
or wrong conversion never leaves a partial OUT behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

import torch

from .config import MambaConfig
from .errors import MambaError, MambaUsageError
from .loading import build_model, read_state_dict, resolve_model_dir
from .quantize import QUANTIZATION_CONFIG, quantize_model_
from .tokenizer import find_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# max |logit difference| / max |logit| allowed after a round trip, per stored precision
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2, "F32": 1e-5, "F16": 2e-2, "BF16": 5e-2, "Q8_0": 5e-2}
_FP32_ALWAYS = ("A_log", "D")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '10KB', '123' -> bytes (decimal units, as transformers uses)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise MambaUsageError(f"--max-shard-size {text!r} is not a size like 2GB, 500MB or 10KB")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise MambaUsageError("--max-shard-size must be positive")
    return size


def load_source(src: str, revision: str | None, tokenizer: str | None) -> tuple[MambaConfig, dict[str, torch.Tensor], Path | str | None]:
    """Config, state dict (HF names) and tokenizer (path, or JSON text from a GGUF) of SRC."""
    if src.endswith(".gguf") and Path(src).is_file():
        from .gguf_io import read_gguf

        config, state, tok_json = read_gguf(Path(src))
        return config, state, Path(tokenizer) if tokenizer else tok_json
    path = resolve_model_dir(src, revision)
    config = MambaConfig.from_file(path / "config.json")
    state = read_state_dict(path)
    try:
        tok = find_tokenizer(path, tokenizer)
    except MambaError:
        tok = None  # no tokenizer to copy (e.g. an original-layout repo, offline)
    return config, state, tok


_FP32_PARTS = {"conv": ("conv1d.weight", "conv1d.bias"), "norm": ("norm.weight", "norm_f.weight")}


def _cast_state(model: torch.nn.Module, dtype: torch.dtype, tied: bool, keep_fp32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The model's tensors in the output dtype; A_log, D, int8 scales (and keep_fp32 parts) float32, int8 as is."""
    suffixes = tuple(s for part in keep_fp32 for s in _FP32_PARTS[part])
    out = {}
    for name, p in model.state_dict().items():
        if tied and name.startswith("lm_head."):
            continue
        keep = name.rsplit(".", 1)[-1] in _FP32_ALWAYS or name.endswith(suffixes)
        target = p.dtype if not p.is_floating_point() or name.endswith("weight_scale") else torch.float32 if keep else dtype
        out[name] = p.detach().to(target).contiguous()
    return out


def write_hf(out: Path, config: MambaConfig, state: dict[str, torch.Tensor], dtype: str, max_shard: int, report: Callable[[str], None]) -> None:
    """config.json, model.safetensors (or shards + index), generation_config.json."""
    from safetensors.torch import save_file

    config.torch_dtype = dtype
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > max_shard:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        report(f"wrote model.safetensors ({len(state)} tensors, {sum(t.nbytes for t in state.values()) / 1e6:.1f} MB)")
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        report(f"wrote {name} ({len(shard)} tensors, {sum(t.nbytes for t in shard.values()) / 1e6:.1f} MB)")
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_original(out: Path, config: MambaConfig, state: dict[str, torch.Tensor], report: Callable[[str], None]) -> None:
    """The state-spaces layout: original config.json and pytorch_model.bin (tensors only)."""
    (out / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2) + "\n")
    renamed = {name.replace("backbone.embeddings.", "backbone.embedding."): t for name, t in state.items()}
    if config.tie_word_embeddings:
        renamed["lm_head.weight"] = renamed["backbone.embedding.weight"]  # mamba_ssm saves the tied head too
    torch.save(renamed, out / "pytorch_model.bin")
    report(f"wrote pytorch_model.bin ({len(renamed)} tensors)")


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a fixed pseudo-random 48-token probe, for before/after comparisons."""
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1234))
    return model(ids.to(model.device))


def convert(
    src: str,
    out: Path,
    to: str = "hf",
    dtype: str = "float32",
    force: bool = False,
    revision: str | None = None,
    tokenizer: str | None = None,
    max_shard_size: str = "2GB",
    gguf_type: str | None = None,
    verify: bool = True,
    keep_fp32: tuple[str, ...] = (),
    quantize: str = "none",
    report: Callable[[str], None] = lambda s: None,
) -> float | None:
    """Convert SRC to OUT in format `to`; returns the verified max |logit difference| (or None).

    With quantize="int8" the HF checkpoint holds int8 weights (quantize.py); verification then
    checks what was written against the quantized model, and the report also gives the
    quantization's own logit difference from SRC.
    """
    if to not in ("hf", "orig", "gguf"):
        raise MambaUsageError(f"--to {to!r} is unknown; choose hf, orig or gguf")
    if quantize not in ("none", "int8"):
        raise MambaUsageError(f"--quantize {quantize!r} is unknown; choose none or int8")
    if quantize == "int8" and to != "hf":
        raise MambaUsageError("--quantize int8 writes the hf layout only (for GGUF use --gguf-type Q8_0)")
    if dtype not in DTYPES:
        raise MambaUsageError(f"--dtype {dtype!r} is unknown; choose float32, bfloat16 or float16")
    unknown = set(keep_fp32) - set(_FP32_PARTS)
    if unknown:
        raise MambaUsageError(f"--keep-fp32 {','.join(sorted(unknown))}: choose from conv, norm")
    qtype = gguf_type or {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    max_shard = parse_size(max_shard_size)
    out = Path(out)
    if out.exists() and not force:
        raise MambaError(f"{out} already exists; pass --force to replace it")
    config, state, tok = load_source(src, revision, tokenizer)
    source_model = build_model(config, state, torch.float32, torch.device("cpu"), Path(src))  # validates names/shapes
    expected = probe_logits(source_model) if verify else None
    if quantize == "int8" and not source_model.quantization:
        quantize_model_(source_model)
        config.quantization_config = dict(QUANTIZATION_CONFIG)
        if verify:
            quantized = probe_logits(source_model)
            report(f"int8: max |logit difference| {(quantized - expected).abs().max().item():.3g} from the unquantized source on the probe")
            expected = quantized
    cast = _cast_state(source_model, DTYPES[dtype], config.tie_word_embeddings, keep_fp32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        tmp.mkdir(mode=0o700)  # inside the try: a Ctrl-C right after it still removes the folder
        if to == "gguf":
            from .gguf_io import write_gguf

            tok_path = _tokenizer_file(tok, tmp)
            target = tmp / out.name
            write_gguf(target, config, {k: v.float() for k, v in cast.items()}, tok_path, qtype)
            if tok_path is not None and tok_path.parent == tmp:
                tok_path.unlink()
            report(f"wrote {out.name} ({target.stat().st_size / 1e6:.1f} MB, {qtype})")
        else:
            target = tmp
            if to == "hf":
                write_hf(tmp, config, cast, dtype, max_shard, report)
            else:
                write_original(tmp, config, cast, report)
            tok_path = _tokenizer_file(tok, tmp)
            if tok_path is not None and tok_path != tmp / "tokenizer.json":
                shutil.copy(tok_path, tmp / "tokenizer.json")
        diff = _verify(target, to, expected, TOLERANCE[qtype if to == "gguf" else dtype]) if verify else None
        if diff is not None:
            report(f"verify: max |logit difference| {diff:.3g} against the source on a 48-token probe")
        _move_into_place(target, out, force)
    except OSError as exc:  # disk full, read-only or vanished directory: nothing partial remains
        raise MambaError(f"cannot write {out}: {exc.strerror or exc}; nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff


def _tokenizer_file(tok: Path | str | None, tmp: Path) -> Path | None:
    """A path to tokenizer.json: the source's file, or the JSON from a GGUF written into tmp."""
    if tok is None or isinstance(tok, Path):
        return tok
    path = tmp / "tokenizer.json"
    path.write_text(tok, encoding="utf-8")
    return path


def _verify(target: Path, to: str, expected: torch.Tensor, tolerance: float) -> float:
    """Reload what was written and compare its probe logits with the source's."""
    if to == "gguf":
        from .gguf_io import read_gguf

        config, state, _ = read_gguf(target)
    else:
        config, state = MambaConfig.from_file(target / "config.json"), read_state_dict(target)
    model = build_model(config, state, torch.float32, torch.device("cpu"), target)
    got = probe_logits(model)
    diff = (got - expected).abs().max().item()
    if not diff <= tolerance * expected.abs().max().item():
        raise MambaError(f"verification failed: the written model's logits differ from the source's by {diff:.3g} (max allowed {tolerance * expected.abs().max().item():.3g}); nothing was written")
    return diff


def _usual_permissions(target: Path) -> None:
    """Give the output the modes a plain write would (the temporary directory and some writers use 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [target, *target.rglob("*")] if target.is_dir() else [target]
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _move_into_place(target: Path, out: Path, force: bool) -> None:
    """Rename the finished output onto OUT (replacing it only with --force), with the usual permissions."""
    _usual_permissions(target)
    if out.exists():
        if not force:
            raise MambaError(f"{out} already exists; pass --force to replace it")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()
    os.replace(target, out)
