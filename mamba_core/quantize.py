"""Weight-only int8 quantization: int8 weights with one float32 scale per output channel.

What is quantized: every layer's in_proj and out_proj, and the embedding table, which is also the
tied output head: 96% of a Mamba's weights, so a decoded token reads about a quarter of the
float32 bytes. x_proj and dt_proj (the other 4%: they produce the step sizes and B, C that the
recurrence compounds over thousands of tokens), the norms, the conv, A and D keep the model dtype.
Activations are not quantized: the int8 weights are widened to the activation dtype on use
(in csrc/cpu for decode-sized inputs, by dequantizing in torch otherwise).

Scheme: symmetric per row, w ~ q * s with s = max|w_row| / 127 and q = round(w / s) in [-127, 127].
On disk (`mamba convert --quantize int8`): each int8 tensor keeps its name (`...in_proj.weight`)
next to a float32 `...in_proj.weight_scale`, and config.json says
"quantization_config": {"quant_method": "mamba-int8", ...}.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops.reference import TorchOps

QUANT_METHOD = "mamba-int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "scheme": "symmetric, per output channel",
                       "modules": ["in_proj", "out_proj", "embeddings", "lm_head"]}


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 (out, in) and float32 scales (out,) with weight ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-optional linear layer whose weight is int8 (out, in) with float32 scales (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.ops = TorchOps()  # replaced by the model's backend (set_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias, self.weight_scale)


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a float32 scale per row; returns float32."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(num_embeddings))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.weight_scale[ids].unsqueeze(-1)  # (b, l, h)


def quantize_model_(model: nn.Module, quantize_values: bool = True) -> nn.Module:
    """Replace the quantized modules of a MambaForCausalLM by int8 ones, in place.

    With quantize_values=False (loading a quantized checkpoint, on the meta device) only the
    module structure changes; the checkpoint's tensors are assigned afterwards.
    """

    def int8(module: nn.Module, new: nn.Module) -> nn.Module:
        if quantize_values:
            new.weight, new.weight_scale = quantize_tensor(module.weight)
            if getattr(module, "bias", None) is not None:
                new.bias = module.bias
        return new

    for layer in model.backbone.layers:
        for name in ("in_proj", "out_proj"):
            linear = getattr(layer.mixer, name)
            setattr(layer.mixer, name, int8(linear, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)))
    table = model.backbone.embeddings
    model.backbone.embeddings = int8(table, Int8Embedding(*table.weight.shape))
    head = Int8Linear(model.config.hidden_size, model.config.vocab_size, False)
    model.lm_head = head if model.config.tie_word_embeddings else int8(model.lm_head, head)
    model.quantization = "int8"
    model.tie_weights()
    model.use_ops(model.backbone.layers[0].mixer.ops)
    return model
