"""The CUDA path (pytest -m cuda; skipped without a GPU): kernels vs float64, model, graphs."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from mamba_core.loading import load_model
from mamba_core.ops.reference import TorchOps, sequential_scan

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def kernels():
    from mamba_core.kernels import cuda_backend

    return cuda_backend("cuda")


def _inputs(b, length, d, n, seed, offset=3):
    """Scan inputs in float64; B and C follow `offset` columns of bc (as they follow dt's low rank in
    x_proj's output): 3 leaves their rows unaligned (the scan's element loads), 8 aligns them to 16 bytes
    (its vector loads, where d and n allow)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(generator=g, device="cuda", dtype=torch.float64)
    xz = torch.randn(b, length, 2 * d, **kw)
    bc = torch.randn(b, length, offset + 2 * n, **kw)
    return dict(xz=xz, delta=torch.randn(b, length, d, **kw), bc=bc, A=-torch.rand(d, n, **kw) * 8, D=torch.randn(d, **kw),
                bias=torch.randn(d, **kw) - 1, h0=torch.randn(b, d, n, **kw), offset=offset)


def _reference(x, n, initial):
    """The float64 recurrence on the test inputs (from the initial state or from zeros)."""
    u, z = x["xz"].chunk(2, dim=-1)
    h = x["h0"] if initial else torch.zeros_like(x["h0"])
    o = x["offset"]
    return sequential_scan(u, x["delta"], x["A"], x["bc"][..., o : o + n], x["bc"][..., o + n :], x["D"], z, x["bias"], h)


def _run(kernels, x, n, initial, dtype):
    cast = lambda t: t.to(dtype)  # noqa: E731
    u, z = cast(x["xz"]).chunk(2, dim=-1)  # strided views, as in the model
    bc, o = cast(x["bc"]), x["offset"]
    state = (x["h0"] if initial else torch.zeros_like(x["h0"])).float().contiguous()
    y = kernels.selective_scan(u, cast(x["delta"]), x["A"].float(), bc[..., o : o + n], bc[..., o + n :], x["D"].float(), z, x["bias"].float(), state)
    return y, state


@pytest.mark.parametrize("length", [1, 2, 7, 2048, 4097, 65536])
@pytest.mark.parametrize("shape", [(1, 64, 16), (16, 96, 16), (3, 50, 5), (2, 40, 40), (2, 40, 8)])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("offset", [3, 8])  # B, C rows unaligned / aligned: element / vector loads (d % 4 == 0, n in 4..16)
def test_scan_float32(kernels, length, shape, initial, offset):
    b, d, n = shape
    if length == 65536 and b * d > 1000:
        pytest.skip("65536 steps tested on the smaller shapes (the reference loop is sequential)")
    x = _inputs(b, length, d, n, seed=length + b, offset=offset)
    y_ref, h_ref = _reference(x, n, initial)
    y, state = _run(kernels, x, n, initial, torch.float32)
    assert rel_err(y, y_ref) <= 1e-5 and rel_err(state, h_ref) <= 1e-5


@pytest.mark.parametrize("length", [1, 7, 2048, 4097])
@pytest.mark.parametrize("b, d, n", [(4, 96, 16), (2, 40, 8), (3, 64, 32), (2, 50, 16)])  # vector loads but for d = 50
@pytest.mark.parametrize("offset", [3, 8])
def test_scan_bfloat16(kernels, length, b, d, n, offset):
    x = _inputs(b, length, d, n, seed=length, offset=offset)
    y_ref, h_ref = _reference(x, n, True)
    y, state = _run(kernels, x, n, True, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y_ref) <= 1e-2 and rel_err(state, h_ref) <= 1e-2


def test_scan_bfloat16_long_memory_state(kernels):
    """bf16 inputs use the hardware's exp2 for the decays, whose errors compound most when dt is small
    (decays within 1e-4 of 1, memory of thousands of steps): the float32 state must stay far inside
    bf16's rounding (3.9e-3) against the float64 recurrence on the same bf16-rounded inputs."""
    x = _inputs(2, 4097, 96, 16, seed=5, offset=8)
    x["bias"] = x["bias"] - 5  # dt ~ softplus(-6 +- 1): 0.001..0.02
    x["A"] = x["A"] / 8
    # the kernel takes dt's bias in the inputs' dtype, as a bf16 model stores it
    rounded = {k: (v.to(torch.bfloat16).double() if k in ("xz", "delta", "bc", "bias") else v) for k, v in x.items()}
    y_ref, h_ref = _reference(rounded, 16, True)
    y, state = _run(kernels, x, 16, True, torch.bfloat16)
    assert rel_err(state, h_ref) <= 2e-4 and rel_err(y.float(), y_ref) <= 4e-3


@pytest.mark.parametrize("kernel", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 7, 200])
@pytest.mark.parametrize("dim, dtype", [(70, torch.float32), (96, torch.float32), (96, torch.bfloat16)])  # 96: 16-byte rows, packed loads
def test_conv(kernels, kernel, length, dim, dtype):
    g = torch.Generator(device="cuda").manual_seed(kernel * length)
    x = torch.randn(3, length, 2 * dim, generator=g, device="cuda").to(dtype)[..., :dim]
    w, bias = torch.randn(dim, kernel, generator=g, device="cuda").to(dtype), torch.randn(dim, generator=g, device="cuda").to(dtype)
    state0 = torch.randn(3, dim, kernel, generator=g, device="cuda").to(dtype)
    ref_state, state = state0.clone(), state0.clone()
    expected = TorchOps().causal_conv1d(x, w, bias, ref_state)
    cut = length // 2
    got = torch.cat([kernels.causal_conv1d(x[:, a:e], w, bias, state) for a, e in ((0, cut), (cut, length)) if e > a], dim=1)
    assert rel_err(got.float(), expected.float()) <= (1e-6 if dtype == torch.float32 else 8e-3) and torch.equal(state, ref_state)


def test_ahead_changes_nothing(kernels):
    """A tensor pulled into L2 meanwhile (`ahead`: 5 MB, and one of an odd length that is skipped) is
    a hint: the norm and the decode step (float32 and bf16 state) give bit-identical results with it."""
    g = torch.Generator(device="cuda").manual_seed(5)
    b, d, n, r, h = 64, 1536, 16, 48, 768

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    hid, res, norm_w = rand(b, 1, h), rand(b, 1, h, dtype=torch.float32), rand(h)
    u, z, dt_low, dt_w, B, C = rand(b, 1, d), rand(b, 1, d), rand(b, 1, r), rand(d, r), rand(b, 1, n), rand(b, 1, n)
    A, D, dt_b = -torch.rand(d, n, device="cuda", generator=g), rand(d, dtype=torch.float32), rand(d)
    for ahead in (rand(2560, 1024), rand(1001)):
        plain, hinted = kernels.add_rms_norm(hid, res, norm_w, 1e-5, True), kernels.add_rms_norm(hid, res, norm_w, 1e-5, True, ahead=ahead)
        assert all(torch.equal(p, q) for p, q in zip(plain, hinted))
        for state in (rand(b, d, n, dtype=torch.float32), rand(b, d, n)):
            h1, h2 = state.clone(), state.clone()
            y1 = kernels.decode_step(u, dt_low, dt_w, A, B, C, D, z, dt_b, h1)
            y2 = kernels.decode_step(u, dt_low, dt_w, A, B, C, D, z, dt_b, h2, ahead=ahead)
            assert torch.equal(y1, y2) and torch.equal(h1, h2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_fp32", [True, False])
@pytest.mark.parametrize("first, cast_input", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("h", [770, 2560, 5000])
@pytest.mark.parametrize("rows", [2, 150])  # decoding; a prompt (a row per block; 770: 4 values held per thread, else 12, 5000 in two rounds)
def test_add_rms_norm_matches_torch(kernels, dtype, residual_fp32, first, cast_input, h, rows):
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(rows // 2, 2, h, device="cuda", generator=g).to(dtype)
    residual = None if first else torch.randn(rows // 2, 2, h, device="cuda", generator=g).to(torch.float32 if residual_fp32 else dtype)
    weight = (torch.rand(h, device="cuda", generator=g) + 0.5).to(dtype)
    want = TorchOps().add_rms_norm(x, residual, weight, 1e-5, residual_fp32, cast_input)
    got = kernels.add_rms_norm(x, residual, weight, 1e-5, residual_fp32, cast_input)
    assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])  # the sum: exactly torch's
    assert got[0].dtype == dtype and rel_err(got[0].float(), want[0].double()) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("n", [16, 4, 1, 12])  # 12: not a power of two, the unfused fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, d", [(5, 200), (33, 1000), (37, 4000)])
@pytest.mark.parametrize("r", [13, 48, 160])  # dt in 3 and 10 pieces per lane; 13: element by element, B and C unaligned
def test_decode_step_matches_float64(kernels, n, dtype, b, d, r):
    """The one-token step against the float64 recurrence: a batch row per thread, and 4 per thread
    in the largest grid (37 x 125 blocks of 32 channels), the last group partial."""
    x = _inputs(b, 1, d, n, seed=n)
    g = torch.Generator(device="cuda").manual_seed(1)
    low = torch.randn(b, 1, r + 2 * n, device="cuda", dtype=torch.float64, generator=g)  # as x_proj's output
    weight = torch.randn(d, r, device="cuda", dtype=torch.float64, generator=g) / 4
    cast = lambda t: t.to(dtype)  # noqa: E731
    lowc, w = cast(low), cast(weight)
    delta = torch.nn.functional.linear(lowc[..., :r], w).double()  # the unfused path rounds dt_proj's output to the dtype
    u, z = x["xz"].chunk(2, dim=-1)
    want, h_want = sequential_scan(cast(u).double(), delta, x["A"], lowc[..., r : r + n].double(), lowc[..., r + n :].double(),
                                   x["D"], cast(z).double(), x["bias"], x["h0"])
    uc, zc = cast(x["xz"]).chunk(2, dim=-1)
    for state_dtype in (torch.float32, dtype):  # float32, and the model dtype (read and stored as bf16)
        state = x["h0"].to(state_dtype).contiguous()
        y = kernels.decode_step(uc, lowc[..., :r], w, x["A"].float(), lowc[..., r : r + n], lowc[..., r + n :], x["D"].float(), zc, x["bias"].float(), state)
        assert state.dtype == state_dtype and rel_err(state.float(), h_want) <= (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(y.float(), want) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n, k, bias", [(1, 3072, 768, False), (3, 80, 1536, False), (8, 769, 64, True), (1, 50280, 768, False),
                                             (1, 160, 4096, True)])
def test_gemv_matches_float64(kernels, dtype, rows, n, k, bias):
    """One row (several rows go to the other product kernels): weight rows held in registers (small
    grids of whole rows) or only prefetched (50,280 rows; rows of 4,096)."""
    g = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(rows, 1, k, device="cuda", generator=g).to(dtype)
    w = torch.randn(n, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    got = kernels.linear(x, w, b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (rows, 1, n) and got.dtype == dtype
    assert rel_err(got, want) <= (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, n, skip, limit", [(1, 50280, 0, 50277), (1, 50280, 0, 50280), (64, 50280, 0, 50277), (3, 2048, 0, 2045),
                                                  (3, 2048, 1, 2045), (2, 40, 0, 9)])
def test_argmax_matches_torch(kernels, dtype, rows, n, skip, limit):
    """Greedy draws: the first index of the largest value per row, as torch.argmax, over logits
    [skip, limit) of n (the tokenizer's vocabulary: a strided view; skip 1: rows not 16-byte aligned),
    with ties (rounded to few values), NaN (counts as largest) and -0 / +0 rows."""
    g = torch.Generator(device="cuda").manual_seed(n + rows)
    logits = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    logits[0] = (logits[0] * 2).round()  # many ties at the maximum
    if rows > 2:
        logits[1, limit // 3] = logits[1, limit // 2] = float("nan")
        logits[2, :] = -0.0
        logits[2, limit // 2] = 0.0
    view = logits[:, skip:limit]
    out = torch.full((rows,), -1, dtype=torch.long, device="cuda")
    assert kernels.argmax(view, out) is out and torch.equal(out, torch.argmax(view, dim=-1))
    assert torch.equal(kernels.argmax(view.float(), out.clone()), torch.argmax(view.float(), dim=-1))


sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm_90+ (clusters)")


@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 8, 17, 64])
@pytest.mark.parametrize("cols", [64, 16])
@pytest.mark.parametrize("n, k, bias", [(3072, 768, False), (80, 1536, True), (100, 40, True), (768, 4096, False), (130, 2056, False)])
def test_rows_gemm_matches_float64(kernels, dtype, rows, cols, n, k, bias):
    """The tensor-core product for a few rows: k split over a cluster (up to 8 blocks, k not a multiple
    of the slice), n not a multiple of the 64- or 16-column tile, rows not a multiple of 16 (with 16
    columns, warps left without a row tile); within the output's rounding (half an ulp: 2e-3 in bf16,
    2.4e-4 in fp16) of float64 on the same inputs."""
    g = torch.Generator(device="cuda").manual_seed(rows * n + k)
    x = torch.randn(rows, 1, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    got = kernels.module.rows_gemm(x, w, b, 0, cols)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (rows, 1, n) and got.dtype == dtype
    assert ((got.double() - want).abs() / want.abs().clamp_min(0.1)).max() <= (4e-3 if dtype == torch.bfloat16 else 5e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel, bias, residual", [(4, True, "fp32"), (3, False, None), (2, True, "model"), (4, False, "model")])
@pytest.mark.parametrize("h, d", [(768, 1536), (512, 2560), (1104, 1536)])  # 1104: the norm in two rounds
def test_norm_in_proj_conv_step_matches_torch(kernels, dtype, kernel, bias, residual, h, d):
    """The fused add + RMSNorm + in_proj + conv step of one token against the torch ops, for a first
    block (no residual) and float32 or model-dtype residual streams; 2d = 3,072 rows hold their
    weights in registers, 5,120 (more than one wave of blocks) only prefetch them."""
    g = torch.Generator(device="cuda").manual_seed(kernel)
    x = torch.randn(1, 1, h, device="cuda", generator=g).to(dtype)
    res = None if residual is None else torch.randn(1, 1, h, device="cuda", generator=g).to(torch.float32 if residual == "fp32" else dtype)
    norm_w = (1 + torch.randn(h, device="cuda", generator=g) / 4).to(dtype)
    weight = (torch.randn(2 * d, h, device="cuda", generator=g) / 30).to(dtype)
    b = torch.randn(2 * d, device="cuda", generator=g).to(dtype) if bias else None
    conv_w, conv_b = torch.randn(d, kernel, device="cuda", generator=g).to(dtype), torch.randn(d, device="cuda", generator=g).to(dtype)
    state = torch.randn(1, d, kernel, device="cuda", generator=g).to(dtype)
    want_state, got_state = state.clone(), state.clone()
    fp32 = residual == "fp32"
    normed, want_res = TorchOps().add_rms_norm(x, res, norm_w, 1e-5, fp32)
    want = (*TorchOps().in_proj_conv_step(normed, weight, b, None, conv_w, conv_b, want_state), want_res)
    got = kernels.module.norm_in_proj_conv_step(x, res, norm_w, 1e-5, fp32, weight, b, conv_w, conv_b, got_state)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype and rel_err(g_.float(), w_.double()) <= tol
    assert torch.equal(got[2], want_res)  # the residual stream is exact
    assert rel_err(got_state.float(), want_state.double()) <= tol


def test_model_logits_and_greedy_match_cpu(tiny):
    gpu = load_model("tiny-wikitext", dtype="float32", device="cuda", backend="cuda-kernels").model
    assert gpu.backend == "cuda-kernels"
    ids = torch.randint(0, 2045, (4, 300), generator=torch.Generator().manual_seed(0))
    assert rel_err(gpu(ids.cuda()).cpu(), tiny.model(ids)) <= 1e-5
    prompt = torch.tensor([[578, 1243, 376]])
    assert torch.equal(gpu.generate(prompt.cuda(), max_new_tokens=40).cpu(), tiny.model.generate(prompt, max_new_tokens=40))


@pytest.mark.parametrize("dtype, batch", [("float32", 1), ("bfloat16", 1), ("bfloat16", 8), ("float16", 16), ("float16", 33), ("bfloat16", 64),
                                          ("float32", 64)])
def test_decoded_tokens_match_torch_path(dtype, batch):
    """Decoding against the torch ops: one row (the fused norm + in_proj + conv kernel, GEMV, decode
    step), 8 or 16 rows (the tensor-core products on sm_90+), 33 and 64 rows (cuBLAS for in_proj in
    16-bit and for every product in float32, the 16-column tensor-core product for the narrow x_proj and
    out_proj in 16-bit, our other kernels); the 30-token
    prompt of one row takes the narrow product too. In 16-bit, 2e-2 of the largest logit is 2-3 ulps of
    bf16 at the logits' magnitude: a product summed in another order than cuBLAS's (ours in the prompt)
    moves the logits by 1-2 ulps (measured 1.06e-2 against 0.53e-2 with cuBLAS in both prompts)."""
    ids = torch.randint(0, 2045, (batch, 30), generator=torch.Generator().manual_seed(7)).cuda()
    plain = load_model("tiny-wikitext", dtype=dtype, device="cuda", backend="torch").model
    fast = load_model("tiny-wikitext", dtype=dtype, device="cuda", backend="cuda-kernels").model
    caches = plain.make_cache(batch), fast.make_cache(batch)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert rel_err(fast(ids, caches[1]), plain(ids, caches[0])) <= tol
    for step in range(5):
        token = ids[:, step : step + 1]
        assert rel_err(fast(token, caches[1]), plain(token, caches[0])) <= tol
    for a, b in zip([*caches[0].ssm_states, *caches[0].conv_states], [*caches[1].ssm_states, *caches[1].conv_states]):
        assert rel_err(b.float(), a.float()) <= tol


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_state_in_model_dtype_matches_torch_path(batch):
    """Caches with the SSM state in bf16 (`state_dtype`): the kernels (the decode step keeps it in
    bf16, the prompt scan widens it) against the torch ops with the same caches."""
    ids = torch.randint(0, 2045, (batch, 30), generator=torch.Generator().manual_seed(9)).cuda()
    plain = load_model("tiny-wikitext", dtype="bfloat16", device="cuda", backend="torch").model
    fast = load_model("tiny-wikitext", dtype="bfloat16", device="cuda", backend="cuda-kernels").model
    plain.state_dtype = fast.state_dtype = torch.bfloat16
    caches = plain.make_cache(batch), fast.make_cache(batch)
    assert rel_err(fast(ids, caches[1]), plain(ids, caches[0])) <= 2e-2
    for step in range(5):
        token = ids[:, step : step + 1]
        assert rel_err(fast(token, caches[1]), plain(token, caches[0])) <= 2e-2
    for a, b in zip(caches[0].ssm_states, caches[1].ssm_states):
        assert b.dtype == torch.bfloat16 and rel_err(b.float(), a.float()) <= 2e-2


def test_graph_decode_equals_plain_decode():
    from mamba_core.cuda_graph import GraphedDecoder

    model = load_model("tiny-wikitext", dtype="float32", device="cuda").model
    ids = torch.randint(0, 2045, (3, 20), device="cuda")
    plain, graphed = model.make_cache(3), model.make_cache(3)
    model(ids, plain)
    model(ids, graphed)
    step = GraphedDecoder(model, graphed)
    token = ids[:, -1]
    for _ in range(10):
        expected = model(token[:, None], plain, logits_to_keep=1)[:, -1]
        got = step(token)
        assert rel_err(got, expected) <= 1e-6
        token = expected.argmax(-1)


@pytest.mark.parametrize("dtype, batch", [("float32", 2), ("bfloat16", 1)])
@pytest.mark.parametrize("temperature", [1.2, 0.0])  # 0: greedy, on the model dtype's logits
def test_sampling_in_the_graph_equals_eager_sampling(dtype, batch, temperature):
    """The draw captured with the step (`sampling_step`) picks what the eager sampler picks from the
    same logits with the same seed, token after token, whether given a fresh tensor or its own output
    (which it writes into its input buffer); and a seed draws the same on GPU and CPU."""
    from mamba_core.cuda_graph import sampling_step
    from mamba_core.sampling import Sampler, SamplingParams

    model = load_model("tiny-wikitext", dtype=dtype, device="cuda").model
    ids = torch.randint(0, 2045, (batch, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    params = SamplingParams(seed=5, temperature=temperature)
    plain, graphed = model.make_cache(batch), model.make_cache(batch)
    eager, fused = Sampler(params, 2045), Sampler(params, 2045)
    token = eager(model(ids, plain, logits_to_keep=1)[:, -1])
    assert torch.equal(fused(model(ids, graphed, logits_to_keep=1)[:, -1]), token)
    sample = sampling_step(model, graphed, fused)
    drawn = token
    for i in range(20):
        want = eager(model(token[:, None], plain, logits_to_keep=1)[:, -1])
        drawn = sample(drawn.clone() if i < 10 else drawn)  # the last 10 fed back in place
        assert torch.equal(drawn, want)
        token = want
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(Sampler(params, 4990)(logits.cuda()).cpu(), Sampler(params, 4990)(logits))


def test_generate_cli_on_cuda(tiny_tokenizer):
    from mamba_core.generation import generate
    from mamba_core.sampling import SamplingParams

    gpu = load_model("tiny-wikitext", dtype="float32", device="cuda").model
    result = generate(gpu, tiny_tokenizer, ["The game was", "A"], sampling=SamplingParams(temperature=0), max_new_tokens=20)
    assert result[0].text.startswith(" also a member of the city . \n \n = =")
