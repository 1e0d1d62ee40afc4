"""The compiled CPU kernels against the torch reference, in the model, and the no-compiler fallback;
the CUDA backend's host-side choices."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import rel_err, run_cli
from mamba_core.cuda_graph import decoder_for
from mamba_core.kernels import cpu_backend
from mamba_core.loading import load_model
from mamba_core.ops.reference import TorchOps, sequential_scan

kernels = cpu_backend("cpu")


def _inputs(b, length, d, n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(b, length, 2 * d, generator=g, dtype=torch.float64)
    u, z = xz.chunk(2, dim=-1)  # strided views, as the model passes them
    delta = torch.randn(b, length, d, generator=g, dtype=torch.float64)
    bc = torch.randn(b, length, 3 + 2 * n, generator=g, dtype=torch.float64)
    B, C = bc[..., 3 : 3 + n], bc[..., 3 + n :]
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 8
    D, bias = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, d, n, generator=g, dtype=torch.float64)
    return u, delta, A, B, C, D, z, bias, h0


@pytest.mark.parametrize("length", [1, 2, 7, 64, 4097])
@pytest.mark.parametrize("initial_state", [False, True])
@pytest.mark.parametrize("shape", [(1, 40, 16), (3, 33, 5)])
def test_scan_kernel_matches_float64_reference(length, initial_state, shape):
    b, d, n = shape
    u, delta, A, B, C, D, z, bias, h0 = _inputs(b, length, d, n, seed=length)
    if not initial_state:
        h0 = torch.zeros_like(h0)
    y_ref, h_ref = sequential_scan(u, delta, A, B, C, D, z, bias, h0)
    f = lambda t: t.float()  # noqa: E731
    xz32 = torch.cat([u, z], dim=-1).float()
    u32, z32 = xz32.chunk(2, dim=-1)
    state = h0.float().clone()
    y = kernels.selective_scan(u32, f(delta), f(A), f(B), f(C), f(D), z32, f(bias), state)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(state, h_ref) <= 1e-5


def test_scan_kernel_bfloat16():
    """bf16 inputs: the output against float64 within bf16's rounding, and the state against the
    float64 recurrence of the same rounded inputs, where only the kernel's own arithmetic (its fast
    softplus, silu and exp for 16-bit inputs) differs: measured 5.5e-7 over 300 steps."""
    u, delta, A, B, C, D, z, bias, h0 = _inputs(2, 300, 48, 16, seed=9)
    y_ref, _ = sequential_scan(u, delta, A, B, C, D, z, bias, h0)
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    state = h0.float().clone()
    y = kernels.selective_scan(bf(u), bf(delta), A.float(), bf(B), bf(C), D.float(), bf(z), bias.float(), state)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y_ref) <= 1e-2
    r = lambda t: bf(t).double()  # noqa: E731
    _, h_ref = sequential_scan(r(u), r(delta), A.float().double(), r(B), r(C), D.float().double(), r(z), bias.float().double(), h0.float().double())
    assert rel_err(state, h_ref) <= 5e-6


@pytest.mark.parametrize("kernel", [2, 3, 4, 5])  # 2-4 compiled for their size, 5 the run-time loop
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_kernel_matches_reference_and_continues(kernel, use_bias):
    """Chunks of a prompt and single decoded tokens (the one-token path) continue exactly."""
    g = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 50, 2 * 37, generator=g)[..., :37]  # a strided view
    w, bias = torch.randn(37, kernel, generator=g), torch.randn(37, generator=g) if use_bias else None
    state_ref = torch.randn(2, 37, kernel, generator=g)
    state = state_ref.clone()
    expected = TorchOps().causal_conv1d(x, w, bias, state_ref)
    got = torch.cat([kernels.causal_conv1d(x[:, a:e], w, bias, state) for a, e in ((0, 1), (1, 2), (2, 20), (20, 49), (49, 50))], dim=1)
    assert rel_err(got, expected) <= 1e-6 and torch.equal(state, state_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_fp32", [True, False])
@pytest.mark.parametrize("first, cast_input", [(True, True), (False, True), (False, False)])
def test_add_rms_norm_matches_torch(dtype, residual_fp32, first, cast_input):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 770, generator=g).to(dtype)
    residual = None if first else torch.randn(3, 5, 770, generator=g).to(torch.float32 if residual_fp32 else dtype)
    weight = (torch.rand(770, generator=g) + 0.5).to(dtype)
    want = TorchOps().add_rms_norm(x, residual, weight, 1e-5, residual_fp32, cast_input)
    got = kernels.add_rms_norm(x, residual, weight, 1e-5, residual_fp32, cast_input)
    assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])  # the sum: exactly torch's
    assert got[0].dtype == dtype and rel_err(got[0].float(), want[0].double()) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, bias_scale", [(16, 1.0), (5, 1.0), (16, 12.0)])  # a large bias: softplus's linear and tiny ends
def test_decode_step_matches_torch_ops(dtype, n, bias_scale):
    b, d, r = 3, 70, 13
    g = torch.Generator().manual_seed(2)
    xz = torch.randn(b, 1, 2 * d, generator=g).to(dtype)
    u, z = xz.chunk(2, dim=-1)
    low = torch.randn(b, 1, r + 2 * n, generator=g).to(dtype)  # as x_proj's output: dt_low, B, C views
    weight, bias = (torch.randn(d, r, generator=g) / 4).to(dtype), (torch.randn(d, generator=g) * bias_scale).to(dtype)
    A, D = -torch.rand(d, n, generator=g) * 8, torch.randn(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    args = (u, low[..., :r], weight, A, low[..., r : r + n], low[..., r + n :], D, z, bias)
    want_state, got_state = h0.clone(), h0.clone()
    want = TorchOps().decode_step(*args, want_state)
    got = kernels.decode_step(*args, got_state)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got_state, want_state) <= tol and rel_err(got.float(), want.double()) <= tol


def test_model_with_kernels_matches_torch_path(tiny, tiny_tokenizer):
    fast = load_model("tiny-wikitext", backend="cpu-kernels").model
    assert fast.backend == "cpu-kernels"
    ids = torch.randint(0, 2045, (2, 300), generator=torch.Generator().manual_seed(0))
    assert rel_err(fast(ids), tiny.model(ids)) <= 1e-5
    prompt = torch.tensor([tiny_tokenizer.encode("The game was")])
    assert torch.equal(fast.generate(prompt, max_new_tokens=40), tiny.model.generate(prompt, max_new_tokens=40))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoded_tokens_with_kernels_match_torch_path(dtype):
    """A decoded token through the one-call mixer (GEMV, conv step, decode step) against the torch ops."""
    ids = torch.randint(0, 2048, (3, 30), generator=torch.Generator().manual_seed(5))
    plain = load_model("tiny-wikitext", backend="torch", dtype=dtype).model
    fast = load_model("tiny-wikitext", backend="cpu-kernels", dtype=dtype).model
    caches = plain.make_cache(3), fast.make_cache(3)
    plain(ids, caches[0]), fast(ids, caches[1])
    for step in range(4):
        token = ids[:, step : step + 1]
        want, got = plain(token, caches[0]), fast(token, caches[1])
        assert rel_err(got, want) <= (1e-5 if dtype == "float32" else 1e-2)  # measured 5e-7 / 2e-3
    for a, b in zip([*caches[0].ssm_states, *caches[0].conv_states], [*caches[1].ssm_states, *caches[1].conv_states]):
        assert rel_err(b.float(), a.float()) <= (1e-5 if dtype == "float32" else 1e-2)


def test_state_in_model_dtype():
    """A bf16 model whose caches keep the SSM state in bf16 (`state_dtype`): the compiled backend
    (its kernels widen the state for each call, the one-call mixer steps aside) against the torch ops
    with the same caches, and both against the float32 state: one bf16 rounding of the state per token."""
    ids = torch.randint(0, 2048, (3, 30), generator=torch.Generator().manual_seed(8))
    plain = load_model("tiny-wikitext", backend="torch", dtype="bfloat16").model
    fast = load_model("tiny-wikitext", backend="cpu-kernels", dtype="bfloat16").model
    exact = plain.make_cache(3)
    plain.state_dtype = fast.state_dtype = torch.bfloat16
    caches = plain.make_cache(3), fast.make_cache(3)
    assert all(c.ssm_states[0].dtype == torch.bfloat16 for c in caches) and exact.ssm_states[0].dtype == torch.float32
    plain(ids, caches[0]), fast(ids, caches[1]), plain(ids, exact)
    for step in range(4):
        token = ids[:, step : step + 1]
        want, got, ref = plain(token, caches[0]), fast(token, caches[1]), plain(token, exact)
        assert rel_err(got, want) <= 1e-2 and rel_err(want, ref) <= 2e-2
    for a, b in zip(caches[0].ssm_states, caches[1].ssm_states):
        assert b.dtype == torch.bfloat16 and rel_err(b.float(), a.float()) <= 2e-2  # measured 1.1e-2: each run rounds its own state


@pytest.mark.parametrize("dtype, quantize", [("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_whole_token_step_matches_forward(dtype, quantize):
    """decoder_for's one-call token (`model_step`) against the same model's forward (the same C++
    calls: bit-identical) and the torch path; with more rows than the GEMV takes, it is not used."""
    ids = torch.randint(0, 2048, (3, 30), generator=torch.Generator().manual_seed(6))
    plain = load_model("tiny-wikitext", backend="torch", dtype=dtype, quantize=quantize).model
    fast = load_model("tiny-wikitext", backend="cpu-kernels", dtype=dtype, quantize=quantize).model
    caches = fast.make_cache(3), fast.make_cache(3), plain.make_cache(3)
    fast(ids, caches[0]), fast(ids, caches[1]), plain(ids, caches[2])
    tol = 1e-5 if dtype == "float32" else 2e-2 if quantize else 1e-2  # torch's path rounds w * scale to bf16
    step = decoder_for(fast, caches[0])
    assert step.__qualname__.startswith("CpuKernelOps.decoder")
    token = ids[:, -1]
    for _ in range(5):
        got = step(token)
        forward, want = fast(token[:, None], caches[1])[:, -1], plain(token[:, None], caches[2])[:, -1]
        assert torch.equal(got, forward) and rel_err(got, want) <= tol
        token = got.argmax(-1)
    assert torch.equal(caches[0]._ssm, caches[1]._ssm) and torch.equal(caches[0]._conv, caches[1]._conv)
    assert caches[0].seen_tokens == caches[1].seen_tokens == 35
    assert kernels.decoder(fast, fast.make_cache(kernels.gemv_rows + 1)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2, reason="OpenMP builds are Linux-only; needs 2 cores")
def test_kernels_run_on_several_threads():
    """The kernels are built with OpenMP: without it ATen's parallel_for silently runs serially."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert kernels.module.parallel_threads() == 2
    finally:
        torch.set_num_threads(threads)
    out = run_cli("kernels", "status", "--json")  # says so to users (torch's default: a thread per core)
    cpu = next(r for r in json.loads(out.stdout)["backends"] if r["backend"] == "cpu-kernels")
    assert out.returncode == 0 and cpu["status"] == "built" and cpu["threads"] >= 2


def test_failed_build_falls_back_with_one_warning():
    out = run_cli("generate", "-m", "tiny-wikitext", "--temp", "0", "-n", "8", "-v", "The game was", env={"MAMBA_DISABLE_KERNELS": "1"})
    assert out.returncode == 0 and out.stdout.decode().startswith(" also a member of the city")
    err = out.stderr.decode()
    warnings = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "plain-torch" in warnings[0] and "MAMBA_DISABLE_KERNELS" in warnings[0]
    assert "backend torch" in err


@pytest.mark.parametrize("shape, rows, pulled", [
    ((3072, 768), 64, True),     # 130m in_proj at batch 64: cuBLAS's, 4.7 MB
    ((768, 1536), 32, True),     # 130m out_proj
    ((3072, 768), 8, False),     # our few-row kernel takes it (it prefetches its own weight)
    ((80, 1536), 64, False),     # x_proj: our narrow kernel
    ((2560, 5120), 64, False),   # 2.8b out_proj: 26 MB, more than a third of a 60 MiB L2 (an H200's)
    ((2048, 4096), 8, True),     # 1.4b out_proj at batch 8: too big for ours, 16.8 MB
])
def test_cuda_backend_pulls_ahead_what_cublas_reads(shape, rows, pulled):
    """The CUDA backend's host-side choice (no GPU needed): a weight is pulled into L2 ahead of its
    product where cuBLAS takes it and it fills at most a third of the L2; never without an L2 size."""
    from mamba_core.kernels import CudaKernelOps

    weight = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    assert (CudaKernelOps(None, True, 60 << 20).pull_ahead(weight, rows) is weight) == pulled
    assert CudaKernelOps(None, True, 0).pull_ahead(weight, rows) is None
