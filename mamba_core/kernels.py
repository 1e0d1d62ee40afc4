"""Compiled kernels: built for this machine on first use (torch's C++ extension machinery), cached.

The CPU kernels in csrc/cpu/ are compiled with -O3 -march=native the first time they are needed
(about a minute), into a cache directory keyed by the source, the torch version and the CPU, and
loaded from there afterwards. They are never required: when there is no compiler, no ninja, or
no source checkout, the plain-torch ops run and one warning line says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CACHE: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built kernels live: $MAMBA_KERNEL_CACHE, else ~/.cache/mamba-cli/kernels."""
    root = os.environ.get("MAMBA_KERNEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mamba-cli" / "kernels"
    return Path(root)


def _cpu_signature() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _build_name(sources: list[Path]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_signature().encode())
    return "mamba_cpu_" + digest.hexdigest()[:12]


def load_cpu(build: bool = True):
    """The compiled CPU module; builds it if needed (and allowed). Raises RuntimeError with the reason."""
    if "cpu" in _CACHE:
        result = _CACHE["cpu"]
        if isinstance(result, Exception):
            raise result
        return result
    try:
        _CACHE["cpu"] = _load_cpu(build)
    except RuntimeError as exc:
        _CACHE["cpu"] = exc
        raise
    return _CACHE["cpu"]


def _load_cpu(build: bool):
    if os.environ.get("MAMBA_DISABLE_KERNELS") == "1":
        raise RuntimeError("compiled kernels disabled by MAMBA_DISABLE_KERNELS=1")
    sources = [CSRC / "cpu" / "mamba_cpu.cpp"]
    if not all(s.is_file() for s in sources):
        raise RuntimeError(f"kernel sources not found in {CSRC} (install from a source checkout to build them)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed, so kernels cannot be built (pip install ninja)")
    name = _build_name(sources)
    directory = cache_dir() / name
    built = any(directory.glob(f"{name}*.so"))
    if not built and not build:
        raise RuntimeError("CPU kernels are not built yet (run `mamba kernels build`)")
    if not built:
        import sys

        print("mamba: compiling CPU kernels for this machine (once, about a minute)...", file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in sources], build_directory=str(directory),
                                  extra_cflags=["-O3", "-march=native", "-ffp-contract=fast"], verbose=False)
    except Exception as exc:  # compiler missing or failing: fall back, saying why
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RuntimeError(f"building the CPU kernels failed ({first[:200]})") from None


class CpuKernelOps:
    """The compiled CPU backend: same interface and numerics as `ops.reference.TorchOps`."""

    name = "cpu-kernels"

    def __init__(self, module):
        self.module = module

    def causal_conv1d(self, x, weight, bias, conv_state):
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], x.shape[2], weight.shape[1])
        return self.module.causal_conv1d(x, weight, bias, conv_state)

    def selective_scan(self, u, delta, A, B, C, D, z, delta_bias, ssm_state):
        dt = delta.float() if delta_bias is None else delta.float() + delta_bias.float()
        dt = F.softplus(dt)  # (b, l, d) float32
        if ssm_state is None:
            ssm_state = torch.zeros(u.shape[0], u.shape[2], A.shape[1], device=u.device)
        return self.module.selective_scan(u, dt, A.float().contiguous(), B, C, D, z, ssm_state)


def cpu_backend(device) -> CpuKernelOps:
    """Factory for the ops registry: the compiled CPU ops, or RuntimeError saying why not."""
    if torch.device(device).type != "cpu":
        raise RuntimeError("the CPU kernels run on the CPU only")
    return CpuKernelOps(load_cpu())
