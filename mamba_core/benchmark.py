"""Measuring speed and memory honestly: warm-up excluded, repetitions reported, setup separate.

Tests, named as llama-bench names them:
  pp<N>        prefill: N prompt tokens from an empty state (logits for the last token only)
  tg<N>        decode: N tokens, one forward each, from the cache, greedy as `mamba generate --temp 0`
               decodes (on CUDA one graph per token with the argmax in it)
  tg<N>@d<D>   decode after a D-token prompt (not timed): Mamba's decode cost does not grow with D
Achieved rates: prefill GFLOP/s counts the matmul FLOPs (2 x tokens x matmul weights; the scan's
few FLOPs per state element are left out), decode GB/s counts the weights read per step (every
unique parameter byte, the tied head included) times steps per second.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import time

import torch

from .allocator import release_freed_memory
from .cuda_graph import sampling_step
from .model import MambaForCausalLM
from .sampling import Sampler, SamplingParams


@dataclasses.dataclass
class BenchCase:
    """One row of the grid."""

    batch: int
    n_prompt: int = 0
    n_gen: int = 0
    depth: int = 0

    @property
    def test(self) -> str:
        """llama-bench's name for the case: ppN, tgN or tgN@dD."""
        if self.n_prompt:
            return f"pp{self.n_prompt}"
        return f"tg{self.n_gen}" + (f"@d{self.depth}" if self.depth else "")


def weight_bytes(model: MambaForCausalLM) -> int:
    """Bytes of all unique parameters and int8 weights with their scales (what a decode step reads)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def matmul_params(model: MambaForCausalLM) -> int:
    """Weights that take part in a matmul per prompt token (all layers' projections)."""
    total = 0
    for layer in model.backbone.layers:
        mixer = layer.mixer
        total += sum(m.weight.numel() for m in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj))
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()  # so that an earlier case's retained heap does not count in this one's peak
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_once(model: MambaForCausalLM, case: BenchCase, generator: torch.Generator) -> tuple[float, int]:
    """Time one repetition; returns (seconds, tokens)."""
    device, vocab = model.device, model.config.vocab_size
    cache = model.make_cache(case.batch)
    if case.n_prompt:
        ids = torch.randint(0, vocab, (case.batch, case.n_prompt), generator=generator).to(device)
        _sync(device)
        start = time.perf_counter()
        model(ids, cache, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - start, case.batch * case.n_prompt
    ids = torch.randint(0, vocab, (case.batch, max(case.depth, 1)), generator=generator).to(device)
    logits = model(ids, cache, logits_to_keep=1) if case.depth else None
    token = logits[:, -1].argmax(-1) if logits is not None else ids[:, 0]
    step = sampling_step(model, cache, Sampler(SamplingParams(temperature=0), vocab))  # graph capture (CUDA) here, untimed
    _sync(device)
    start = time.perf_counter()
    for _ in range(case.n_gen):
        token = step(token)
    _sync(device)
    return time.perf_counter() - start, case.batch * case.n_gen


def run_case(model: MambaForCausalLM, case: BenchCase, repetitions: int, seed: int = 0) -> dict:
    """Warm up once (timed separately as setup), then time `repetitions` runs of one case."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    _run_once(model, case, generator)  # warm-up: first-touch allocations, kernel choice
    warmup_s = time.perf_counter() - start
    _reset_peak(model.device)
    samples = []
    for _ in range(repetitions):
        seconds, tokens = _run_once(model, case, generator)
        samples.append(tokens / seconds)
    peak = _peak(model.device)
    mean = statistics.fmean(samples)
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    row = {
        "batch": case.batch, "test": case.test, "n_prompt": case.n_prompt, "n_gen": case.n_gen, "depth": case.depth,
        "tokens_per_s_mean": mean, "tokens_per_s_std": std, "samples": samples, "peak_mem_bytes": peak,
        "ms_per_token": None, "gflops": None, "gbps": None, "warmup_s": warmup_s,
    }
    if case.n_prompt:
        row["gflops"] = 2 * matmul_params(model) * mean / 1e9
    else:
        steps_per_s = mean / case.batch
        row["ms_per_token"] = 1000 / steps_per_s  # latency of one decode step (one token per sequence)
        row["gbps"] = weight_bytes(model) * steps_per_s / 1e9
    return row


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where available."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and hardware for the report's footer."""
    from . import __version__

    env = {"mamba": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpus": os.cpu_count()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env
