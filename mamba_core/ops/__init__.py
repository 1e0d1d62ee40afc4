"""The ops layer: one place where the model's non-matmul work is dispatched.

Dimension glossary (as in mamba-minimal):
  b: batch, l: sequence length, d: inner channels (expand * hidden), n: SSM state size, k: conv kernel.
Layouts are channels-last, the order the projections produce: u, delta, z (b, l, d); B, C (b, l, n).

A backend is an object with these methods (see `reference.TorchOps`, which compiled backends
subclass, so anything they do not fuse falls back to it):
  causal_conv1d(x, weight, bias, conv_state) -> y         prompt chunk, SiLU applied, state updated
  selective_scan(u, delta, A, B, C, D, z, delta_bias, ssm_state) -> y   state updated in place
  decode_step(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state, ahead) -> y   one token, dt_proj fused
  in_proj_conv_step(hidden, weight, bias, scale, conv_weight, conv_bias, conv_state) -> (x, z)   one token
  mixer_step(weights, hidden, conv_state, ssm_state) -> out  one token through a mixer (`reference.StepWeights`)
  mixer_tail(weights, x, z, ssm_state) -> out               one token's mixer after its conv step
  block_step(x, residual, norm_w, eps, residual_fp32, weights, conv_state, ssm_state) -> (out, residual)   norm + mixer
  add_rms_norm(x, residual, weight, eps, residual_fp32, cast_input, ahead) -> (normed, residual)
  pull_ahead(weight, rows) -> weight or None               what the kernel before a product pulls into cache (`ahead`)
  linear(x, weight, bias, scale) -> y                     projections; int8 weights with scales
  argmax(x, out) -> out                                   greedy draws: each row's first largest index
Compiled backends (csrc/) are listed here with the device type they run on and chosen by `get_ops`; the plain-torch backend is
the reference every other backend is tested against, and the fallback everywhere.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..errors import MambaError, MambaUsageError
from .reference import TorchOps


def _cpu_kernels(device: object) -> object:
    from ..kernels import cpu_backend

    return cpu_backend(device)


def _cuda_kernels(device: object) -> object:
    from ..kernels import cuda_backend

    return cuda_backend(device)


# name -> (the device type it runs on, or None for any; factory(device) returning an ops object or
# raising RuntimeError saying why it cannot run).
_BACKENDS: dict[str, tuple[str | None, Callable[[object], object]]] = {
    "torch": (None, lambda device: TorchOps()),
    "cpu-kernels": ("cpu", _cpu_kernels),
    "cuda-kernels": ("cuda", _cuda_kernels),
}
_WARNED: set[str] = set()


def available_backends() -> list[str]:
    """Names that `get_ops` accepts, besides 'auto'."""
    return sorted(_BACKENDS)


def get_ops(name: str = "auto", device: object = "cpu") -> object:
    """Return the ops object for `name` on `device`; 'auto' picks the fastest that can run."""
    device_type = torch.device(device).type
    if name == "auto":
        reasons = []
        for candidate, (runs_on, factory) in _BACKENDS.items():
            if runs_on != device_type:
                continue
            try:
                return factory(device)
            except RuntimeError as exc:
                reasons.append(f"{candidate}: {exc}")
        message = "using the plain-torch ops (slower): " + "; ".join(reasons)
        if reasons and message not in _WARNED:
            _WARNED.add(message)
            warnings.warn(message, stacklevel=2)
        return TorchOps()
    if name not in _BACKENDS:
        raise MambaUsageError(f"--backend {name!r} is unknown; choose one of: auto, {', '.join(available_backends())}")
    runs_on, factory = _BACKENDS[name]
    if runs_on not in (None, device_type):
        raise MambaUsageError(f"--backend {name} runs on {runs_on} devices only, not {device_type}")
    try:
        return factory(device)
    except RuntimeError as exc:
        raise MambaError(f"--backend {name} cannot run here: {exc}") from None
