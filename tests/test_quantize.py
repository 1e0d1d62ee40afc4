"""Low-precision weights on the CPU: the decode matrix-vector kernel, int8 quantization, its checkpoints and quality."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import WIKITEXT, rel_err
from mamba_cli.app import app
from mamba_core.kernels import cpu_backend
from mamba_core.loading import load_model
from mamba_core.quantize import quantize_tensor

kernels = cpu_backend("cpu")
runner = CliRunner()


@pytest.mark.parametrize("n, k, rows", [(1, 16, 1), (37, 29, 1), (100, 128, 3), (4099, 770, 5), (64, 1536, 16), (33, 9000, 2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_gemv_kernel_matches_float64(n, k, rows, bias, weights):
    """The decode matrix-vector kernel against float64 on the same (rounded) inputs; int8 weights with
    bf16 activations take x quantized to int16 per row (k = 9,000: the integer sums moved to float
    every 4,096 elements), within the output's bf16 rounding."""
    g = torch.Generator().manual_seed(n + k + rows)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    b = b if bias else None
    if weights == "int8":
        q, scale = quantize_tensor(w)
        want = x.double() @ (q.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
        assert rel_err(kernels.module.linear_rows(x, q, b, scale), want) <= 1e-6
        xb = x.bfloat16()
        want = xb.double() @ (q.double() * scale.double()[:, None]).T + (b.double() if bias else 0)
        got = kernels.module.linear_rows(xb[None], q, b, scale)  # bf16 activations, leading dims kept
        assert got.dtype == torch.bfloat16 and got.shape == (1, rows, n) and rel_err(got[0].float(), want) <= 4e-3
        return
    dtype = getattr(torch, weights)
    x, w = x.to(dtype), w.to(dtype)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    got = kernels.module.linear_rows(x[None], w, b, None)
    assert got.dtype == dtype and got.shape == (1, rows, n)
    assert rel_err(got[0], want) <= (1e-6 if dtype == torch.float32 else 4e-3)  # bf16: the output's rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_is_bit_identical_to_torch(dtype):
    """Prompts dequantize int8 weights with our one-pass kernel: the same bits as the torch path's
    (q.float() * scale).to(dtype), for rows not a multiple of 16 long and scales of many sizes."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(301, 77, generator=g) * torch.logspace(-30, 30, 301, base=2.0)[:, None]
    q, scale = quantize_tensor(w)
    got = kernels.module.dequantize_rows(q, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, (q.float() * scale[:, None]).to(dtype))


def test_int8_product_of_bf16_activations_keeps_nan_and_zero_rows():
    """The int16 rounding of x must not turn a NaN activation into a number, nor a row of zeros into NaN."""
    q, scale = quantize_tensor(torch.randn(40, 100, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(3, 100).bfloat16()
    x[1] = 0
    x[2, 37] = float("nan")
    got = kernels.module.linear_rows(x, q, None, scale)
    assert torch.equal(got[1], torch.zeros(40, dtype=torch.bfloat16)) and got[2].isnan().all() and not got[0].isnan().any()


def test_quantize_tensor_error_is_half_a_step():
    w = torch.randn(300, 77) * torch.logspace(-3, 2, 300)[:, None]  # rows of very different scales
    q, scale = quantize_tensor(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (300,)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] * 0.5 + 1e-12).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_model_kernels_match_torch_path(dtype):
    ids = torch.randint(0, 2048, (2, 40), generator=torch.Generator().manual_seed(3))
    plain = load_model("tiny-wikitext", backend="torch", quantize="int8", dtype=dtype).model
    fast = load_model("tiny-wikitext", backend="cpu-kernels", quantize="int8", dtype=dtype).model
    assert fast.quantization == "int8" and fast.lm_head.weight is fast.backbone.embeddings.weight
    caches = plain.make_cache(2), fast.make_cache(2)
    want, got = plain(ids, caches[0]), fast(ids, caches[1])  # prefill: torch matmuls on both
    assert rel_err(got, want) <= (1e-5 if dtype == "float32" else 2e-2)
    step = ids[:, :1]
    want, got = plain(step, caches[0]), fast(step, caches[1])  # decode: the int8 kernel
    assert rel_err(got, want) <= (1e-5 if dtype == "float32" else 2e-2)


def test_int8_quality_on_the_fixture(tmp_path):
    """KL(fp32 || int8) per token and top-1 agreement over 20,000 WikiText tokens."""
    result = runner.invoke(app, ["eval-ppl", "-m", "tiny-wikitext", "--quantize", "int8", "--kl-base", "tiny-wikitext",
                                 "--data", str(WIKITEXT), "--limit-tokens", "20000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 < report["kl"]["kl_mean"] < 2e-3 and report["kl"]["top1_agreement"] > 0.95  # measured: 6.7e-4, 97.5%


def test_convert_quantize_int8_round_trip(tmp_path):
    out = tmp_path / "q8"
    result = runner.invoke(app, ["convert", "tiny-wikitext", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mamba-int8"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("backbone.layers.0.mixer.in_proj.weight").dtype == torch.int8
        assert f.get_tensor("backbone.embeddings.weight_scale").dtype == torch.float32
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings
    ids = torch.randint(0, 2048, (1, 30), generator=torch.Generator().manual_seed(5))
    loaded = load_model(str(out)).model
    in_memory = load_model("tiny-wikitext", quantize="int8").model
    assert loaded.quantization == "int8" and torch.equal(loaded(ids), in_memory(ids))
    assert runner.invoke(app, ["convert", "tiny-wikitext", str(tmp_path / "o"), "--quantize", "int8", "--to", "orig"]).exit_code == 2
    assert runner.invoke(app, ["generate", "-m", "tiny-wikitext", "--quantize", "int4", "hi"]).exit_code == 2
