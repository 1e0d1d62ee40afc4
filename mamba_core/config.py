"""MambaConfig: the Hugging Face `MambaConfig` fields, read from either checkpoint layout.

Two `config.json` layouts exist for the same architecture:
  * Hugging Face (`state-spaces/mamba-*-hf`): `hidden_size`, `num_hidden_layers`, `state_size`, ...
  * original state-spaces / mamba_ssm: `d_model`, `n_layer`, `ssm_cfg {d_state, d_conv, ...}`,
    with `vocab_size` rounded up to `pad_vocab_size_multiple` when the model is built.
`MambaConfig.from_dict` accepts both; `to_dict` / `to_original_dict` write either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import MambaError

_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass
class MambaConfig:
    """Hyper-parameters of a Mamba (v1) language model, with transformers' names and defaults."""

    vocab_size: int = 50280
    hidden_size: int = 768
    state_size: int = 16
    num_hidden_layers: int = 32
    layer_norm_epsilon: float = 1e-5
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    expand: int = 2
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    initializer_range: float = 0.1
    residual_in_fp32: bool = True
    time_step_rank: int | str = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    rescale_prenorm_residual: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = True
    intermediate_size: int | None = None  # always expand * hidden_size, as in transformers
    torch_dtype: str | None = None  # the dtype the weights are stored in, when known
    quantization_config: dict | None = None  # {"quant_method": "mamba-int8", ...} for int8 checkpoints

    def __post_init__(self) -> None:
        self.validate()
        self.intermediate_size = int(self.expand * self.hidden_size)
        if self.time_step_rank == "auto":
            self.time_step_rank = math.ceil(self.hidden_size / 16)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Refuse values the architecture cannot run, naming the key (config errors exit 1)."""
        positive = ("vocab_size", "hidden_size", "state_size", "num_hidden_layers", "expand", "conv_kernel")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MambaError(f"config key '{key}' must be a positive integer, found {value!r}")
        if self.vocab_size > 2**24:
            raise MambaError(f"config key 'vocab_size' is implausibly large ({self.vocab_size}); is the config corrupt?")
        if self.hidden_size * self.expand > 2**20 or self.num_hidden_layers > 4096:
            raise MambaError("config 'hidden_size'/'expand'/'num_hidden_layers' are implausibly large; is the config corrupt?")
        if self.conv_kernel > 64:
            raise MambaError(f"config key 'conv_kernel' must be at most 64, found {self.conv_kernel}")
        rank = self.time_step_rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise MambaError(f"config key 'time_step_rank' must be a positive integer or 'auto', found {rank!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise MambaError(f"config key 'layer_norm_epsilon' must be a number in [0, 1), found {eps!r}")
        if self.hidden_act not in ("silu", "swish"):
            raise MambaError(f"config key 'hidden_act' must be 'silu', found {self.hidden_act!r}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise MambaError(f"config key '{key}' must be a non-negative integer or null, found {value!r}")
        for key in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings"):
            if not isinstance(getattr(self, key), bool):
                raise MambaError(f"config key '{key}' must be true or false, found {getattr(self, key)!r}")
        quant = self.quantization_config
        if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mamba-int8"):
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise MambaError(f"config key 'quantization_config' has quant_method {method!r}: only 'mamba-int8' (from `mamba convert --quantize int8`) is supported")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPES:
            raise MambaError(f"config key 'torch_dtype' must be one of {', '.join(_DTYPES)}, found {self.torch_dtype!r}")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MambaConfig":
        """Build a config from a parsed `config.json` in the HF or the original layout.

        Unknown keys are ignored (HF configs carry many). A config for another architecture, or
        one with `rms_norm: false` (LayerNorm Mamba, which this implementation does not run), is
        refused with a clear error.
        """
        if not isinstance(data, dict):
            raise MambaError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type is not None and model_type != "mamba":
            raise MambaError(
                f"config.json has model_type {model_type!r}: this tool runs Mamba (v1) models only (model_type 'mamba')"
            )
        if data.get("rms_norm") is False:
            raise MambaError("config.json has rms_norm: false (LayerNorm Mamba), which is not supported; only RMSNorm models run")
        if "hidden_size" not in data and "d_model" in data:
            data = _original_to_hf(data)
        if "hidden_size" not in data:
            raise MambaError("config.json has neither 'hidden_size' (Hugging Face layout) nor 'd_model' (original layout)")
        if "num_hidden_layers" not in data:
            raise MambaError("config.json is missing the required key 'num_hidden_layers'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields and k != "intermediate_size"}
        dtype = data.get("torch_dtype", data.get("dtype"))
        kwargs["torch_dtype"] = dtype if dtype in _DTYPES else None
        if isinstance(kwargs.get("eos_token_id"), list):  # HF allows a list; the first is the main one
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0] if kwargs["eos_token_id"] else None
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrong type that arithmetic in __post_init__ tripped on
            raise MambaError(f"config.json has a value of the wrong type: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "MambaConfig":
        """Read `config.json` (either layout); errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MambaError(f"{path}: no such file; a model directory needs a config.json") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MambaError(f"{path}: cannot read ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MambaError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        try:
            return cls.from_dict(data)
        except MambaError as exc:
            raise MambaError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` content (all MambaConfig keys)."""
        data = dataclasses.asdict(self)
        data["torch_dtype"] = self.torch_dtype or "float32"
        if data["quantization_config"] is None:
            del data["quantization_config"]  # its presence alone means "quantized" to transformers
        return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", **data}

    def to_original_dict(self) -> dict[str, Any]:
        """The original state-spaces `config.json` content."""
        return {
            "d_model": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {
                "d_state": self.state_size,
                "d_conv": self.conv_kernel,
                "expand": self.expand,
                "dt_rank": self.time_step_rank,
                "conv_bias": self.use_conv_bias,
                "bias": self.use_bias,
            },
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": 1,
            "tie_embeddings": self.tie_word_embeddings,
        }


def _original_to_hf(data: dict[str, Any]) -> dict[str, Any]:
    """Translate an original state-spaces config to HF keys (vocab padded as mamba_ssm pads it)."""
    ssm = data.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise MambaError("config key 'ssm_cfg' must be an object")
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise MambaError(f"config ssm_cfg.layer is {ssm['layer']!r}: only Mamba1 models are supported")
    vocab = data.get("vocab_size", 50277)
    multiple = data.get("pad_vocab_size_multiple", 8)
    if isinstance(vocab, int) and isinstance(multiple, int) and multiple > 0 and vocab % multiple:
        vocab += multiple - vocab % multiple
    out = {
        "hidden_size": data["d_model"],
        "num_hidden_layers": data.get("n_layer"),
        "vocab_size": vocab,
        "state_size": ssm.get("d_state", 16),
        "conv_kernel": ssm.get("d_conv", 4),
        "expand": ssm.get("expand", 2),
        "time_step_rank": ssm.get("dt_rank", "auto"),
        "use_conv_bias": ssm.get("conv_bias", True),
        "use_bias": ssm.get("bias", False),
        "residual_in_fp32": data.get("residual_in_fp32", True),
        "tie_word_embeddings": data.get("tie_embeddings", True),
    }
    if "layer_norm_epsilon" in data or "norm_epsilon" in data:
        out["layer_norm_epsilon"] = data.get("layer_norm_epsilon", data.get("norm_epsilon"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype"):
        if key in data:
            out[key] = data[key]
    return out
