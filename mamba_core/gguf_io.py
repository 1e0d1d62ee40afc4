"""GGUF files with llama.cpp's `mamba` architecture: write (convert) and read (load, round-trip).

Written with the `gguf` package, llama.cpp's own reader/writer. Layout, as llama.cpp expects:
  token_embd, output_norm, output (only when untied), and per block N: attn_norm, ssm_in,
  ssm_conv1d (weight squeezed to [inner, kernel], bias), ssm_x, ssm_dt (weight, bias),
  ssm_a (stored as A = -exp(A_log)), ssm_d, ssm_out.
1-D tensors, ssm_a and the conv weight stay F32 (as llama.cpp's converter does); the large 2-D
matrices take the requested type (F32, F16, BF16 or Q8_0). The tokenizer is embedded as a
GPT-2-style BPE (tokens, token types, merges, special ids, pre-tokenizer "gpt-2").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import MambaConfig
from .errors import MambaError

_BLOCK = {
    "norm.weight": "attn_norm.weight",
    "mixer.in_proj.weight": "ssm_in.weight",
    "mixer.in_proj.bias": "ssm_in.bias",
    "mixer.conv1d.weight": "ssm_conv1d.weight",
    "mixer.conv1d.bias": "ssm_conv1d.bias",
    "mixer.x_proj.weight": "ssm_x.weight",
    "mixer.dt_proj.weight": "ssm_dt.weight",
    "mixer.dt_proj.bias": "ssm_dt.bias",
    "mixer.A_log": "ssm_a",
    "mixer.D": "ssm_d",
    "mixer.out_proj.weight": "ssm_out.weight",
    "mixer.out_proj.bias": "ssm_out.bias",
}
_TOP = {"backbone.embeddings.weight": "token_embd.weight", "backbone.norm_f.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")
_CONFIG_KEY = "mamba_cli.config"  # our full MambaConfig, so our own files round-trip exactly


def gguf_name(hf_name: str) -> str:
    """HF parameter name -> GGUF tensor name."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # backbone.layers.N.rest
    return f"blk.{layer}.{_BLOCK[rest]}"


def hf_name(name: str) -> str:
    """GGUF tensor name -> HF parameter name."""
    for hf, gg in _TOP.items():
        if gg == name:
            return hf
    _, layer, rest = name.split(".", 2)
    for hf, gg in _BLOCK.items():
        if gg == rest:
            return f"backbone.layers.{layer}.{hf}"
    raise MambaError(f"GGUF tensor {name!r} is not part of a Mamba model")


def write_gguf(path: Path, config: MambaConfig, state: dict[str, torch.Tensor], tokenizer_json: Path | None, qtype: str = "F32") -> None:
    """Write `state` (HF names, float32) and the tokenizer as one GGUF file at `path`."""
    import gguf
    import numpy as np

    types = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "BF16": gguf.GGMLQuantizationType.BF16, "Q8_0": gguf.GGMLQuantizationType.Q8_0}
    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                  "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_context_length(2**20)  # Mamba has no context limit; llama.cpp reads this key
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_ssm_conv_kernel(config.conv_kernel)
    writer.add_ssm_inner_size(config.intermediate_size)
    writer.add_ssm_state_size(config.state_size)
    writer.add_ssm_time_step_rank(int(config.time_step_rank))
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_ssm_dt_b_c_rms(False)
    writer.add_file_type(file_types[qtype])
    writer.add_string(_CONFIG_KEY, json.dumps(config.to_dict()))
    if tokenizer_json is not None:
        _add_tokenizer(writer, tokenizer_json, config)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float()
        if name.endswith("A_log"):
            data = -torch.exp(data.double()).float()  # float64 so that reading back log(-A) is exact to an ulp
        if name.endswith("conv1d.weight"):
            data = data.squeeze(1)  # (d, 1, k) -> (d, k)
        array = data.contiguous().numpy()
        target = qtype if data.dim() == 2 and not name.endswith(("A_log", "conv1d.weight")) else "F32"
        if target == "Q8_0" and array.shape[-1] % 32:
            target = "F16"  # Q8_0 needs rows that are a multiple of its 32-value block
        if target in ("F32", "F16"):
            writer.add_tensor(gguf_name(name), array.astype(np.float32 if target == "F32" else np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, types[target]), raw_dtype=types[target])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, tokenizer_json: Path, config: MambaConfig) -> None:
    """Embed a byte-level BPE tokenizer.json as llama.cpp's 'gpt2' tokenizer."""
    import gguf

    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise MambaError(f"{tokenizer_json}: only BPE tokenizers can be embedded in GGUF (found {model.get('type')})")
    vocab = dict(model["vocab"])
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    size = max(config.vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (("bos", config.bos_token_id), ("eos", config.eos_token_id), ("pad", config.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(False)


def read_gguf(path: Path) -> tuple[MambaConfig, dict[str, torch.Tensor], str | None]:
    """Config, float32 state dict (HF names) and tokenizer.json text from a mamba GGUF file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/KeyError/... on corrupt files
        raise MambaError(f"{path}: not a readable GGUF file ({exc})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    if arch != "mamba":
        raise MambaError(f"{path}: GGUF architecture is {arch!r}; only 'mamba' is supported")
    state = {}
    for t in reader.tensors:
        data = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        name = hf_name(t.name)
        if name.endswith("A_log"):
            data = torch.log(-data.double()).float()
        if name.endswith("conv1d.weight"):
            data = data.unsqueeze(1)
        state[name] = data.reshape(data.shape if name.endswith("conv1d.weight") else tuple(reversed([int(x) for x in t.shape])))
    stored = field(_CONFIG_KEY)
    if stored:
        config = MambaConfig.from_dict(json.loads(stored))
    else:
        hidden = field("mamba.embedding_length")
        config = MambaConfig.from_dict({
            "hidden_size": hidden,
            "num_hidden_layers": field("mamba.block_count"),
            "vocab_size": state["backbone.embeddings.weight"].shape[0],
            "state_size": field("mamba.ssm.state_size"),
            "conv_kernel": field("mamba.ssm.conv_kernel"),
            "expand": field("mamba.ssm.inner_size") // hidden,
            "time_step_rank": field("mamba.ssm.time_step_rank"),
            "layer_norm_epsilon": field("mamba.attention.layer_norm_rms_epsilon", 1e-5),
            "use_bias": "backbone.layers.0.mixer.in_proj.bias" in state,
            "use_conv_bias": "backbone.layers.0.mixer.conv1d.bias" in state,
            "tie_word_embeddings": "lm_head.weight" not in state,
            "bos_token_id": field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": field("tokenizer.ggml.padding_token_id"),
        })
    return config, state, _tokenizer_json(field)


def _tokenizer_json(field) -> str | None:
    """Rebuild a tokenizer.json (byte-level BPE) from GGUF's tokenizer keys."""
    if field("tokenizer.ggml.model") != "gpt2":
        return None
    tokens, types, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), field("tokenizer.ggml.merges") or []
    vocab, added = {}, []
    for index, (text, kind) in enumerate(zip(tokens, types)):
        if kind == 5:  # UNUSED padding rows
            continue
        if kind in (3, 4):  # CONTROL, USER_DEFINED
            added.append({"id": index, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": kind == 3})
        vocab[text] = index
    spec = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": list(merges)},
    }
    return json.dumps(spec, ensure_ascii=False)
