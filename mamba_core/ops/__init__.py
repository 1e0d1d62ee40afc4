"""The ops layer: one place where the model's non-matmul work is dispatched.

Dimension glossary (as in mamba-minimal):
  b: batch, l: sequence length, d: inner channels (expand * hidden), n: SSM state size, k: conv kernel.
Layouts are channels-last, the order the projections produce: u, delta, z (b, l, d); B, C (b, l, n).

A backend is an object with three methods (see `reference.TorchOps`):
  causal_conv1d(x, weight, bias, conv_state) -> y         prompt chunk, SiLU applied, state updated
  selective_scan(u, delta, A, B, C, D, z, delta_bias, ssm_state) -> y   state updated in place
  decode_step(x, dt, B, C, z, weight, bias, A, D, delta_bias, conv_state, ssm_state) -> y
Compiled backends (csrc/) register here and are chosen by `get_ops`; the plain-torch backend is
the reference every other backend is tested against, and the fallback everywhere.
"""

from __future__ import annotations

import warnings
from typing import Callable

from ..errors import MambaError, MambaUsageError
from .reference import TorchOps


def _cpu_kernels(device: object) -> object:
    from ..kernels import cpu_backend

    return cpu_backend(device)


def _cuda_kernels(device: object) -> object:
    from ..kernels import cuda_backend

    return cuda_backend(device)


# name -> factory(device) returning an ops object, or raising RuntimeError saying why it cannot run.
_BACKENDS: dict[str, Callable[[object], object]] = {
    "torch": lambda device: TorchOps(),
    "cpu-kernels": _cpu_kernels,
    "cuda-kernels": _cuda_kernels,
}
_WARNED: set[str] = set()


def register_backend(name: str, factory: Callable[[object], object]) -> None:
    """Make a compiled backend selectable by name (called by the kernel loaders)."""
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    """Names that `get_ops` accepts, besides 'auto'."""
    return sorted(_BACKENDS)


def get_ops(name: str = "auto", device: object = "cpu") -> object:
    """Return the ops object for `name` on `device`; 'auto' picks the fastest that can run."""
    if name == "auto":
        reasons = []
        for candidate in [n for n in _BACKENDS if n != "torch"]:
            try:
                return _BACKENDS[candidate](device)
            except RuntimeError as exc:
                reasons.append(f"{candidate}: {exc}")
        message = "using the plain-torch ops (slower): " + "; ".join(r for r in reasons if "only" not in r)
        if reasons and message not in _WARNED and any("only" not in r for r in reasons):
            _WARNED.add(message)
            warnings.warn(message, stacklevel=2)
        return TorchOps()
    if name not in _BACKENDS:
        raise MambaUsageError(f"--backend {name!r} is unknown; choose one of: auto, {', '.join(available_backends())}")
    try:
        return _BACKENDS[name](device)
    except RuntimeError as exc:
        raise MambaError(f"--backend {name} cannot run here: {exc}") from None
