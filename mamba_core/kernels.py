"""Compiled kernels: built for this machine on first use (torch's C++ extension machinery), cached.

The CPU kernels in csrc/cpu/ are compiled with -O3 -march=native, the CUDA kernels in csrc/cuda/
for the compute capability of the GPU present only (e.g. sm_90), the first time they are needed,
into a cache directory keyed by the sources, the torch version and the CPU or GPU, and loaded from
there afterwards. They are never required: when there is no compiler, no ninja, no CUDA, or no
source checkout, the plain-torch ops run and one warning line says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops.reference import TorchOps

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


def _build_name(kind: str, sources: list[Path], target: str, flags: dict) -> str:
    digest = hashlib.sha256(repr(sorted(flags.items())).encode())
    for source in sources:
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(target.encode())
    return f"mamba_{kind}_" + digest.hexdigest()[:12]


def _cached(kind: str, loader, build: bool):
    """Load (and remember) a kernel module, or remember and re-raise why it cannot be loaded."""
    if kind not in _CACHE:
        try:
            _CACHE[kind] = loader(build)
        except RuntimeError as exc:
            _CACHE[kind] = exc
    result = _CACHE[kind]
    if isinstance(result, Exception):
        raise result
    return result


def load_cpu(build: bool = True):
    """The compiled CPU module; builds it if needed (and allowed). Raises RuntimeError with the reason."""
    sources = [CSRC / "cpu" / name for name in ("mamba_cpu.cpp", "linear_cpu.cpp", "decode_cpu.cpp", "model_cpu.cpp", "blocks.h", "vec.h")] + [CSRC / "norm_tensors.h"]
    # -fopenmp: ATen's parallel_for is inline OpenMP in torch's headers and runs serially without
    # it; the OpenMP symbols then resolve to the libgomp that torch itself loads (one thread pool).
    # Only on Linux, where torch ships libgomp: elsewhere (Apple clang has no -fopenmp) the kernels
    # build serial rather than not at all.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    flags = {"extra_cflags": ["-O3", "-march=native", "-ffp-contract=fast", *openmp]}
    return _cached("cpu", lambda b: _compile("cpu", sources, _cpu_signature(), b, flags), build)


def load_cuda(build: bool = True):
    """The compiled CUDA module for the current GPU's architecture only. RuntimeError says why not."""
    return _cached("cuda", lambda b: build_cuda(build=b), build)


def build_cuda(csrc: Path = CSRC, build: bool = True, defines: tuple[str, ...] = ()):
    """The CUDA module built from the sources under `csrc` (this checkout's, or another tree's for an
    A/B comparison), with extra `-D` defines (the benchmarks' variants), for the current GPU's
    architecture only; cached by a hash of the sources and flags. RuntimeError says why not."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # build for this GPU only: fast
    cuda = csrc / "cuda"  # translation units compiled in parallel (see csrc/cuda/ops.h), then the headers (hashed only)
    sources = [*sorted(cuda.glob("*.cu")), *sorted(cuda.glob("*.cpp")), *sorted(cuda.glob("*.cuh")), *sorted(cuda.glob("*.h")), csrc / "norm_tensors.h"]
    flags = {"extra_cuda_cflags": ["-O3", "-std=c++17", *(f"-D{d}" for d in defines)], "extra_cflags": ["-O3"]}
    return _compile("cuda", sources, f"sm_{major}{minor} cuda {torch.version.cuda}", build, flags, label=f"sm_{major}{minor}")


def _compile(kind: str, sources: list[Path], target: str, build: bool, flags: dict, label: str = "this CPU"):
    """Build (or load the cached build of) `sources` with torch's extension machinery."""
    if os.environ.get("MAMBA_DISABLE_KERNELS") == "1":
        raise RuntimeError("compiled kernels disabled by MAMBA_DISABLE_KERNELS=1")
    if not all(s.is_file() for s in sources):
        raise RuntimeError(f"kernel sources not found in {CSRC} (install from a source checkout to build them)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed, so kernels cannot be built (pip install ninja)")
    name = _build_name(kind, sources, target, flags)
    directory = cache_dir() / name
    built = any(directory.glob(f"{name}*.so"))
    if not built and not build:
        raise RuntimeError(f"{kind.upper()} kernels are not built yet (run `mamba kernels build`)")
    if not built:
        import sys

        print(f"mamba: compiling {kind.upper()} kernels for {label} (once, about a minute)...",
              file=sys.stderr, flush=True)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(name=name, sources=[str(s) for s in sources if s.suffix not in (".cuh", ".h")], build_directory=str(directory),
                                  verbose=False, **flags)
    except Exception as exc:  # compiler missing or failing: fall back, saying why
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RuntimeError(f"building the {kind.upper()} kernels failed ({first[:200]})") from None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or D as float32, contiguous: as the single-op CPU kernels convert them on each call."""
    return None if t is None else t.float().contiguous()


class _KernelOps(TorchOps):
    """A compiled backend: same interface and numerics as `ops.reference.TorchOps` (its fallback)."""

    name = "kernels"
    hints = False  # do the module's norm and decode step take an `ahead` tensor (CUDA)?
    model_dtype_state = False  # does the compiled decode step take a state in the model dtype as it is?

    def __init__(self, module):
        self.module = module

    def _ahead(self, ahead) -> tuple:
        """The module's trailing `ahead` argument, where it takes one."""
        return (ahead,) if self.hints else ()

    def causal_conv1d(self, x, weight, bias, conv_state):
        if conv_state is None:
            conv_state = x.new_zeros(x.shape[0], x.shape[2], weight.shape[1])
        return self.module.causal_conv1d(x, weight, bias, conv_state)

    def add_rms_norm(self, x, residual, weight, eps, residual_fp32, cast_input=True, ahead=None):
        if weight.dtype != x.dtype:
            return super().add_rms_norm(x, residual, weight, eps, residual_fp32, cast_input)
        return tuple(self.module.add_rms_norm(x, residual, weight, eps, residual_fp32, cast_input, *self._ahead(ahead)))

    def _keeps(self, ssm_state, dtype) -> bool:
        """Does the compiled decode step take this state as it is (float32, or the model dtype where it can)?"""
        return ssm_state.dtype == torch.float32 or (self.model_dtype_state and ssm_state.dtype == dtype)

    def decode_step(self, u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state, ahead=None):
        if dt_weight.dtype != u.dtype or not self._keeps(ssm_state, u.dtype):
            return super().decode_step(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state)
        return self.module.decode_step(u, dt_low, dt_weight, A.float().contiguous(), B, C, D, z, delta_bias, ssm_state,
                                       *self._ahead(ahead))

    def selective_scan(self, u, delta, A, B, C, D, z, delta_bias, ssm_state):
        """The compiled scan (backend's `_scan`) from a float32 state: a state kept in another dtype is
        widened for the call and rounded back after it."""
        if ssm_state is None:
            ssm_state = torch.zeros(u.shape[0], u.shape[2], A.shape[1], device=u.device)
        if ssm_state.dtype == torch.float32:
            return self._scan(u, delta, A, B, C, D, z, delta_bias, ssm_state)
        h = ssm_state.float()
        y = self._scan(u, delta, A, B, C, D, z, delta_bias, h)
        ssm_state.copy_(h)
        return y


class CpuKernelOps(_KernelOps):
    """The compiled CPU backend (csrc/cpu): a decoded token runs each layer's mixer in one call (`mixer_step`)."""

    name = "cpu-kernels"
    gemv_rows = 16  # up to this many rows of x, products use the matrix-vector kernel

    @staticmethod
    def _gemv_takes(x_dtype, weight) -> bool:
        """Can the matrix-vector kernel take this weight (contiguous; int8, or float32/bf16 as x)?"""
        return weight.is_contiguous() and (weight.dtype == torch.int8 or weight.dtype == x_dtype in (torch.float32, torch.bfloat16))

    def linear(self, x, weight, bias=None, scale=None):
        """Our matrix-vector kernel for a few rows; torch's matmul for more, an int8 weight
        dequantized by our one-pass kernel (bit-identical to the torch path's three ops)."""
        if x.numel() <= self.gemv_rows * x.shape[-1] and self._gemv_takes(x.dtype, weight):
            return self.module.linear_rows(x, weight, bias, scale)
        if scale is not None and x.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous():
            return F.linear(x, self.module.dequantize_rows(weight, scale.float().contiguous(), x.dtype), bias)
        return super().linear(x, weight, bias, scale)

    def _fuses_mixer(self, w, rows: int, dtype) -> bool:
        """Can `rows` decoded tokens of dtype take the one-call mixer with these StepWeights?"""
        return rows <= self.gemv_rows and dtype in (torch.float32, torch.bfloat16) and w.dt_w.dtype == dtype and all(self._gemv_takes(dtype, m) for m in (w.in_w, w.x_w, w.out_w))

    def mixer_step(self, w, hidden, conv_state, ssm_state):
        if not (self._fuses_mixer(w, hidden.shape[0], hidden.dtype) and ssm_state.dtype == torch.float32):
            return super().mixer_step(w, hidden, conv_state, ssm_state)
        return self.module.mixer_step(hidden, conv_state, ssm_state, *w)

    def decoder(self, model, cache):
        """A decoded token through the whole model in one C++ call (`model_step`: the forward's
        arithmetic, without its ~240 Python calls per token), or None where some layer or the cache
        would leave the fused path. The weights are gathered once, here: like a captured CUDA
        graph, the step serves one generation."""
        dtype, backbone, head = model.dtype, model.backbone, model.lm_head
        norms = [layer.norm.weight for layer in backbone.layers]
        steps = [layer.mixer.step_weights() for layer in backbone.layers]
        if not (all(n.dtype == dtype for n in [*norms, backbone.norm_f.weight]) and self._gemv_takes(dtype, head.weight)
                and cache._conv.dtype == dtype and cache._ssm.dtype == torch.float32
                and all(self._fuses_mixer(w, cache.batch_size, dtype) for w in steps)):
            return None
        layers = [t for norm, w in zip(norms, steps) for t in (norm, *w._replace(in_b=_f32(w.in_b), dt_b=_f32(w.dt_b), D=_f32(w.D), out_b=_f32(w.out_b)))]
        args = (backbone.embeddings.weight, getattr(backbone.embeddings, "weight_scale", None), layers, cache._conv, cache._ssm,
                backbone.norm_f.weight, backbone.norm_f.variance_epsilon, model.config.residual_in_fp32, head.weight,
                getattr(head, "weight_scale", None))

        def step(tokens: torch.Tensor) -> torch.Tensor:
            logits = self.module.model_step(tokens, *args)  # (b, vocab) float32
            cache.seen_tokens += 1
            return logits

        return step

    def _scan(self, u, delta, A, B, C, D, z, delta_bias, ssm_state):
        if delta.dtype not in (u.dtype, torch.float32):
            delta = delta.float()
        return self.module.selective_scan(u, delta, A.float().contiguous(), B, C, D, z, delta_bias, ssm_state)


class CudaKernelOps(_KernelOps):
    """The compiled CUDA backend (everything in csrc/cuda, softplus included)."""

    name = "cuda-kernels"
    # Products of 2..few_rows rows of 16-bit x with weights of at most few_rows_weights elements use
    # our tensor-core kernel (sm_90+), others cuBLAS: chosen on an H200 (benchmarks/gemm_microbench.py
    # and whole-model decoding). Alone, ours takes 2.6-3.3 us for the 130m x_proj and out_proj against
    # cuBLAS's 4.1-5.8, but 4.0-4.7 us for its in_proj against 3.4, and 1.5-2.7x cuBLAS's time at 64
    # rows or for the 1.4b and 2.8b in_proj and out_proj; with the 130m in_proj too, a decode step at
    # batch 8 took 0.510 ms instead of 0.545, as ours start early after the kernels before them.
    few_rows, few_rows_weights = 16, 1 << 22
    # Narrow weights (x_proj: 80-160 rows, k <= 4096) also at 17-64 rows of x, in 16-column tiles:
    # 130m b64 x_proj 3.6 us against cuBLAS's 4.3 (and 5.1 in 64-column tiles), and it starts early.
    narrow_rows, narrow_cols, narrow_k = 64, 256, 4096

    hints = True
    model_dtype_state = True

    def __init__(self, module, clusters: bool, l2_bytes: int = 0):
        super().__init__(module)
        self.clusters = clusters  # sm_90+: thread-block clusters (rows_gemm)
        self.l2_bytes = l2_bytes  # the GPU's L2 cache (0: never pull a weight ahead)

    def _scan(self, u, delta, A, B, C, D, z, delta_bias, ssm_state):
        return self.module.selective_scan(u, delta, A.float().contiguous(), B, C, D, z, delta_bias, ssm_state)

    @staticmethod
    def _aligned(x, weight, scale) -> bool:
        """Can our product kernels take x and weight? One dtype, no int8 scale, contiguous and
        16-byte aligned, rows a multiple of 16 bytes long."""
        return (scale is None and weight.dtype == x.dtype and x.shape[-1] % (16 // x.element_size()) == 0
                and x.is_contiguous() and x.data_ptr() % 16 == 0 and weight.is_contiguous() and weight.data_ptr() % 16 == 0)

    def _product(self, rows: int, k: int, weight, dtype) -> str:
        """Which kernel takes a product of `rows` rows of k elements (aligned, no int8 scale) with
        `weight`: 'gemv', 'rows' or 'narrow' (ours), or 'cublas'."""
        if rows == 1:
            return "gemv"
        if rows <= max(self.few_rows, self.narrow_rows) and self.clusters and dtype != torch.float32 and k <= 6144:
            if rows <= self.few_rows and weight.numel() <= self.few_rows_weights:
                return "rows"
            if weight.shape[0] <= self.narrow_cols and k <= self.narrow_k:
                return "narrow"
        return "cublas"

    def linear(self, x, weight, bias=None, scale=None):
        """Our kernels where they beat cuBLAS on an H200 (and can start early in a decode chain): the
        GEMV for one row, the tensor-core kernel for a few rows and small or narrow weights; cuBLAS
        otherwise."""
        rows, k = x.numel() // x.shape[-1], x.shape[-1]
        kind = self._product(rows, k, weight, x.dtype) if self._aligned(x, weight, scale) else "cublas"
        if kind == "gemv":
            return self.module.gemv(x, weight, bias)
        if kind != "cublas":
            return self.module.rows_gemm(x, weight, bias, 0, 16 if kind == "narrow" else 64)
        return super().linear(x, weight, bias, scale)

    def pull_ahead(self, weight, rows):
        """cuBLAS cannot start before the kernel ahead of it ends (its nvjet kernels do not wait inside,
        so a graph edge into them cannot be made programmatic: they then read their inputs too early),
        and then reads its weight from DRAM (130m at 64 rows: in_proj 4.8 us cold, 3.7 warm; out_proj
        5.1 / 4.4): the norm pulls the in_proj weight and the decode step the out_proj weight into L2
        meanwhile, where cuBLAS takes the product and the weight fills at most a third of the L2 (more
        evicts what the chain reads: the 2.8b out_proj's 26 MB cost 2.4% per token at batch 64 on an
        H200), and where the kernel has blocks enough to issue it (decode.cu, ahead_of). Ours prefetch
        their own weights."""
        if self._product(rows, weight.shape[1], weight, weight.dtype) == "cublas" and 3 * weight.nbytes <= self.l2_bytes:
            return weight
        return None

    def argmax(self, x, out):
        """Ours (a cluster of blocks per row, launched early): torch's reduction took 15 us of a 250 us
        130m decode step on an H200 for one 50,280-logit row, ours 3.3 us."""
        if x.dim() != 2 or x.stride(-1) != 1 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or out.dtype != torch.long:
            return super().argmax(x, out)
        self.module.argmax(x, out)
        return out

    def block_step(self, x, residual, norm_w, eps, residual_fp32, w, conv_state, ssm_state):
        res_dtype = torch.float32 if residual_fp32 else x.dtype
        if not (x.numel() == x.shape[-1] and self._aligned(x, w.in_w, w.in_scale) and norm_w.dtype == x.dtype and 2 <= w.conv_w.shape[1] <= 4
                and (residual is None or residual.dtype == res_dtype)):
            return super().block_step(x, residual, norm_w, eps, residual_fp32, w, conv_state, ssm_state)
        xc, z, residual = self.module.norm_in_proj_conv_step(x, residual, norm_w, eps, residual_fp32, w.in_w, w.in_b, w.conv_w, w.conv_b, conv_state)
        return self.mixer_tail(w, xc, z, ssm_state), residual

    def decode_step(self, u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state, ahead=None):
        if A.shape[1] not in (1, 2, 4, 8, 16, 32):  # the fused kernel keeps a channel's states in one warp
            return TorchOps.decode_step(self, u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state)
        return super().decode_step(u, dt_low, dt_weight, A, B, C, D, z, delta_bias, ssm_state, ahead)


def cuda_backend(device) -> CudaKernelOps:
    """Factory for the ops registry: the compiled CUDA ops, or RuntimeError saying why not."""
    props = torch.cuda.get_device_properties(device)
    return CudaKernelOps(load_cuda(), props.major >= 9, props.L2_cache_size)


def cpu_backend(device) -> CpuKernelOps:
    """Factory for the ops registry: the compiled CPU ops, or RuntimeError saying why not."""
    return CpuKernelOps(load_cpu())
