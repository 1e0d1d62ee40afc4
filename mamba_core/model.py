"""The Mamba language model, with Hugging Face's module and parameter names.

Parameter names match `state-spaces/mamba-*-hf` checkpoints exactly (backbone.embeddings.weight,
backbone.layers.N.norm.weight, backbone.layers.N.mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,
out_proj}, backbone.norm_f.weight, lm_head.weight tied to the embeddings), so their safetensors
load with no renaming. Shapes: h hidden, d inner (expand * h), n state, r time-step rank, k conv.

Every forward runs over a `MambaCache` when given one, reading it as the past and leaving the
state after the last token in it, so any split of a prompt into chunks gives the same result
as the whole prompt at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MambaCache
from .config import MambaConfig
from .ops import get_ops
from .ops.reference import StepWeights

_KEEP_FP32 = ("A_log", "D")  # parameters that stay float32 whatever the model dtype


def _skip_init_on_meta(cls: type) -> type:
    """A torch layer class that skips random init on the meta device (loading overwrites it).

    Random init on meta tensors costs a second of lazy torch imports and is thrown away anyway.
    """

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            cls.reset_parameters(self)

    return type(cls.__name__, (cls,), {"reset_parameters": reset_parameters})


Conv1d, Embedding = (_skip_init_on_meta(c) for c in (nn.Conv1d, nn.Embedding))


class Linear(_skip_init_on_meta(nn.Linear)):
    """nn.Linear computed by the ops backend (which has a fast matrix-vector product for decode)."""

    ops = get_ops("torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class MambaRMSNorm(nn.Module):
    """RMSNorm in float32 as transformers' MambaRMSNorm, fused with the residual add before it."""

    ops = get_ops("torch")

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, residual_fp32: bool, cast_input: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); see `TorchOps.add_rms_norm`."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon, residual_fp32, cast_input)


class MambaMixer(nn.Module):
    """The selective SSM block: in_proj -> causal conv -> x_proj/dt_proj -> scan -> gate -> out_proj."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        h, d, n = config.hidden_size, config.intermediate_size, config.state_size
        self.layer_idx = layer_idx
        self.state_size = n
        self.time_step_rank = int(config.time_step_rank)
        self.in_proj = Linear(h, 2 * d, bias=config.use_bias)
        self.conv1d = Conv1d(d, d, config.conv_kernel, groups=d, padding=config.conv_kernel - 1, bias=config.use_conv_bias)
        self.x_proj = Linear(d, self.time_step_rank + 2 * n, bias=False)
        self.dt_proj = Linear(self.time_step_rank, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))  # (d, n); S4D-real init A = -(1..n)
        self.D = nn.Parameter(torch.empty(d))
        if self.A_log.device.type != "meta":  # (arange on meta costs a second of lazy imports)
            with torch.no_grad():
                self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(d, n))
                self.D.fill_(1.0)
        self.out_proj = Linear(d, h, bias=config.use_bias)
        self.ops = get_ops("torch")
        self._A, self._A_key = None, None

    def A(self) -> torch.Tensor:
        """A = -exp(A_log) (d, n) float32, recomputed only when A_log changes (not per token)."""
        key = (self.A_log.data_ptr(), self.A_log._version, self.A_log.device)
        if key != self._A_key:
            with torch.no_grad():
                self._A = -torch.exp(self.A_log.float())
            self._A_key = key
        return self._A

    def step_weights(self) -> StepWeights:
        """This mixer's tensors as a decoded token's `ops.mixer_step` takes them (int8 scales or None)."""
        return StepWeights(self.in_proj.weight, self.in_proj.bias, getattr(self.in_proj, "weight_scale", None), self.conv1d.weight[:, 0, :],
                           self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A(), self.D,
                           self.out_proj.weight, self.out_proj.bias, getattr(self.out_proj, "weight_scale", None))

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden (b, l, h) -> (b, l, h); reads and updates this layer's states in `cache`."""
        conv_state = cache.conv_states[self.layer_idx] if cache is not None else None
        ssm_state = cache.ssm_states[self.layer_idx] if cache is not None else None
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d) each
        x = self.ops.causal_conv1d(x, self.conv1d.weight[:, 0, :], self.conv1d.bias, conv_state)  # (d, k) taps
        dt, B, C = self.x_proj(x).split([self.time_step_rank, self.state_size, self.state_size], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (b, l, d); the bias is added inside the scan in fp32
        y = self.ops.selective_scan(x, dt, self.A(), B, C, self.D, z, self.dt_proj.bias, ssm_state)
        return self.out_proj(y)


class MambaBlock(nn.Module):
    """Pre-norm residual block: s = residual + x; returns (mixer(norm(s)), s).

    The same arithmetic as transformers' `s + mixer(norm(s))`, with the add moved into the next
    norm so that one fused op does both (the residual stays float32 if configured).
    """

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cache: MambaCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] == 1 and cache is not None:  # one decoded token: backends fuse the block
            m = self.mixer
            return m.ops.block_step(x, residual, self.norm.weight, self.norm.variance_epsilon, self.residual_in_fp32, m.step_weights(),
                                    cache.conv_states[m.layer_idx], cache.ssm_states[m.layer_idx])
        normed, residual = self.norm(x, residual, self.residual_in_fp32)
        return self.mixer(normed, cache), residual


class MambaModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm: ids (b, l) -> hidden (b, l, h)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embeddings = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        hidden = self.embeddings(input_ids).to(self.norm_f.weight.dtype)  # (b, l, h); int8 tables give float32
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cache)
        if logits_to_keep:
            hidden, residual = hidden[:, -logits_to_keep:], residual[:, -logits_to_keep:]
        fp32 = self.layers[0].residual_in_fp32
        return self.norm_f(hidden, residual, fp32, cast_input=False)[0]  # the final norm reads the sum unrounded


class MambaForCausalLM(nn.Module):
    """A Mamba language model: `model(ids, cache)` returns next-token logits, float32."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = MambaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.backend, self.ops = "torch", get_ops("torch")  # the ops backend in use (`use_ops` sets both)
        self.quantization: str | None = None  # "int8" after quantize.quantize_model_
        self.cpu_prefill_rows = 1024  # rows of float32 activations per prompt chunk on the CPU; see forward
        # The SSM state's dtype in new caches: float32, or the model dtype (half the bytes that a decoded
        # token reads and writes per layer; the CUDA decode step keeps it so, other kernels convert).
        self.state_dtype = torch.float32
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings, make the head use the embedding table (and its int8 scales)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
            if self.quantization:
                self.lm_head.weight_scale = self.backbone.embeddings.weight_scale

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.backbone.norm_f.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (int8 weights, when quantized, are widened to it)."""
        return self.backbone.norm_f.weight.dtype

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None, logits_to_keep: int = 0,
                float_logits: bool = True) -> torch.Tensor:
        """Logits (b, l, vocab) in float32 (in the model dtype with `float_logits=False`: a greedy
        draw inside a CUDA graph saves the conversion's kernel) for ids (b, l), continuing from
        `cache` if given.

        `logits_to_keep=k` computes the head for the last k positions only (1 for generation).
        The cache is updated in place to the state after the last token. On the CPU, with a cache
        and logits_to_keep, a long prompt runs in chunks of about `cpu_prefill_rows` rows (batch x
        tokens) in float32, twice as many in 16-bit dtypes (the same activation bytes): the same
        result (the cache carries the state exactly), with activation memory bounded by the chunk
        instead of the prompt. (bf16 pp2048 in one 2,048-row chunk is 14% faster than in two.)
        """
        if cache is not None and logits_to_keep and self.device.type == "cpu":
            rows = self.cpu_prefill_rows * 4 // self.dtype.itemsize
            step = max(rows // input_ids.shape[0], logits_to_keep)
            while input_ids.shape[1] > step:  # earlier chunks: only the state they leave matters
                head = (input_ids.shape[1] - 1) % step + 1  # so that the rest are whole chunks
                self.backbone(input_ids[:, :head], cache, 1)
                cache.seen_tokens += head
                input_ids = input_ids[:, head:]
        hidden = self.backbone(input_ids, cache, logits_to_keep)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        logits = self.lm_head(hidden.to(self.dtype))
        return logits.float() if float_logits else logits

    def make_cache(self, batch_size: int = 1) -> MambaCache:
        """An empty cache on this model's device, conv state in the model dtype, SSM state in
        `state_dtype` (float32 unless set)."""
        return MambaCache(self.config, batch_size, dtype=self.dtype, device=self.device, ssm_dtype=self.state_dtype)

    def set_backend(self, name: str = "auto") -> str:
        """Choose the ops backend ('auto', 'torch' or a compiled one); returns the name in use."""
        self.use_ops(get_ops(name, self.device))
        return self.backend

    def use_ops(self, ops: object) -> None:
        """Route every layer that computes through the ops layer (mixers, linears) to `ops`."""
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        self.backend = ops.name

    def cast_(self, dtype: torch.dtype) -> "MambaForCausalLM":
        """Cast to `dtype` in place, keeping A_log and D in float32 (better than the reference)."""
        for name, param in self.named_parameters():
            target = torch.float32 if name.rsplit(".", 1)[-1] in _KEEP_FP32 else dtype
            if param.dtype != target:
                param.data = param.data.to(target)
        return self

    def num_parameters(self) -> int:
        """Unique weight count (tied embeddings counted once; int8 weights included)."""
        weights = [*self.parameters(), *(b for b in self.buffers() if b.dtype == torch.int8)]  # no duplicates
        return sum(t.numel() for t in weights)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str | torch.dtype = "auto", device: str = "auto", revision: str | None = None, backend: str = "auto") -> "MambaForCausalLM":
        """Load a model from a local directory (HF or original layout), a hub id or a short name."""
        from .loading import load_model

        return load_model(name_or_path, dtype=dtype, device=device, revision=revision, backend=backend).model

    def generate(self, input_ids, **kwargs):
        """Greedy/sampled continuation of token ids; see `mamba_core.generation.generate_ids`."""
        from .generation import generate_ids

        return generate_ids(self, input_ids, **kwargs)
