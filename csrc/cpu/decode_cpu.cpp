// The non-matmul work of a decoded token in one call per op instead of a dozen torch ops: the
// residual add + RMSNorm, and dt_proj + bias + softplus + the scan step. At one token, each torch
// op costs more in dispatch than in arithmetic (a 130M model decodes 24 layers x ~20 of them).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../norm_tensors.h"
#include "vec.h"

namespace {

using namespace mamba_cpu;

// s = residual + x (in R), out = weight * T(s' * rsqrt(mean(s'^2) + eps)) with s' = T(s) if cast_input:
// the roundings of transformers' torch code (see ops/reference.py: add_rms_norm).
template <typename T, typename R>
void add_rms_norm_rows(const T* x, const R* residual, const T* weight, T* out, R* res_out, int64_t rows, int64_t h, float eps, bool cast_input) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; row++) {
            const T* xr = x + row * h;
            R* sr = res_out + row * h;
            float ss = 0.0f;
            for (int64_t i = 0; i < h; i++) {
                const float sum = residual != nullptr ? static_cast<float>(residual[row * h + i]) + static_cast<float>(xr[i]) : static_cast<float>(xr[i]);
                sr[i] = static_cast<R>(sum);
                const float v = cast_input ? static_cast<float>(static_cast<T>(static_cast<float>(sr[i]))) : static_cast<float>(sr[i]);
                ss += v * v;
            }
            const float scale = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
            for (int64_t i = 0; i < h; i++) {
                const float v = cast_input ? static_cast<float>(static_cast<T>(static_cast<float>(sr[i]))) : static_cast<float>(sr[i]);
                out[row * h + i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(v * scale)));
            }
        }
    });
}

}  // namespace

// (normed, s) for x (..., h) and the residual stream before it (None for the first block).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps,
                                        bool residual_fp32, bool cast_input) {
    const NormTensors t = norm_tensors(x, residual, weight, residual_fp32);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "add_rms_norm", [&] {
        using T = scalar_t;
        auto run = [&](auto rzero) {
            using R = decltype(rzero);
            add_rms_norm_rows<T, R>(t.x.data_ptr<T>(), t.residual.defined() ? t.residual.data_ptr<R>() : nullptr, t.weight.data_ptr<T>(),
                                    t.out.data_ptr<T>(), t.res_out.data_ptr<R>(), t.rows, t.h, static_cast<float>(eps), cast_input);
        };
        if (residual_fp32) run(0.0f); else run(T(0));
    });
    return {t.out, t.res_out};
}

// y (b, 1, d) of one decode step: dt = softplus(T(dt_low (b, 1, r) @ dt_weight (d, r)^T) + bias), as
// the unfused path rounds it, then the scan step from `state` (b, d, n) float32, updated in place.
// Unlike the prompt scan (vectorised over 16 channels, the state read transposed, which a long
// prompt amortises), a step is vectorised over a channel's states: its state row is contiguous.
torch::Tensor decode_step(torch::Tensor u, torch::Tensor dt_low, torch::Tensor dt_weight, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                          c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                          torch::Tensor state) {
    TORCH_CHECK(u.dim() == 3 && u.size(1) == 1 && dt_low.stride(2) == 1, "decode_step takes one token: u (b, 1, d), dt_low (b, 1, r)");
    TORCH_CHECK(dt_weight.scalar_type() == dt_low.scalar_type(), "dt_low and dt_weight must share a dtype");
    const int64_t batch = u.size(0), dim = u.size(2), rank = dt_low.size(2);
    auto w = dt_weight.contiguous();
    auto bias = delta_bias.has_value() ? delta_bias->to(torch::kFloat).contiguous() : torch::zeros({dim}, u.options().dtype(torch::kFloat));
    auto raw = torch::empty({batch, 1, dim}, u.options().dtype(torch::kFloat));  // (b, 1, d) float32
    const int64_t low_sb = dt_low.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, dt_low.scalar_type(), "decode_step", [&] {
        using T = scalar_t;
        const T* low = dt_low.data_ptr<T>();
        const T* wp = w.data_ptr<T>();
        const float* bp = bias.data_ptr<float>();
        float* out = raw.data_ptr<float>();
        TORCH_CHECK(rank <= 256, "decode_step supports a dt rank up to 256");
        for (int64_t b = 0; b < batch; b++) {
            float lowf[256];
            for (int64_t j = 0; j < rank; j++) lowf[j] = static_cast<float>(low[b * low_sb + j]);
            at::parallel_for(0, dim, 64, [&](int64_t begin, int64_t end) {
                for (int64_t c = begin; c < end; c++) {  // 16 lanes of the rank at a time (bf16 widened by a shift)
                    vf acc = {};
                    for (int64_t j = 0; j < rank; j += kLanes) {
                        const int64_t width = std::min(kLanes, rank - j);
                        acc += load_tile(lowf + j, width) * load_tile(wp + c * rank + j, width);
                    }
                    out[b * dim + c] = static_cast<float>(static_cast<T>(hsum(acc))) + bp[c];
                }
            });
        }
    });
    const auto dt = at::softplus(raw).contiguous();  // torch's own, as the prompt path applies it
    TORCH_CHECK(state.is_contiguous() && state.scalar_type() == torch::kFloat && A.is_contiguous() && A.scalar_type() == torch::kFloat,
                "A and state must be contiguous float32");
    TORCH_CHECK(B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type() && B.stride(2) == 1 && C.stride(2) == 1,
                "B and C must have u's dtype and unit stride on n");
    const int64_t nstate = A.size(1);
    auto y = torch::empty({batch, 1, dim}, u.options());
    torch::Tensor Dc = D.has_value() ? D->to(torch::kFloat).contiguous() : torch::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, u.scalar_type(), "decode_step_scan", [&] {
        using T = scalar_t;
        const T* up = u.data_ptr<T>();
        const T* zp = z.has_value() ? z->data_ptr<T>() : nullptr;
        const T* Bp = B.data_ptr<T>();
        const T* Cp = C.data_ptr<T>();
        const float* dtp = dt.data_ptr<float>();
        const float* Ap = A.data_ptr<float>();
        const float* Dp = D.has_value() ? Dc.data_ptr<float>() : nullptr;
        float* hp = state.data_ptr<float>();
        T* yp = y.data_ptr<T>();
        const int64_t u_sb = u.stride(0), z_sb = z.has_value() ? z->stride(0) : 0, b_sb = B.stride(0), c_sb = C.stride(0);
        at::parallel_for(0, batch * dim, 256, [&](int64_t begin, int64_t end) {
            for (int64_t i0 = begin; i0 < end; i0 += kLanes) {  // 16 (b, c) rows at a time
                const int64_t rows = std::min(kLanes, end - i0);
                vf sum = {}, uv = {}, dskip = {}, zv = {};  // one lane per row
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t i = i0 + r, b = i / dim, c = i % dim;
                    const float dtv = dtp[i];
                    uv[r] = static_cast<float>(up[b * u_sb + c]);
                    dskip[r] = Dp != nullptr ? Dp[c] : 0.0f;
                    zv[r] = zp != nullptr ? static_cast<float>(zp[b * z_sb + c]) : 0.0f;
                    const float du = dtv * uv[r];
                    float* h = hp + i * nstate;
                    vf acc = {};
                    for (int64_t n0 = 0; n0 < nstate; n0 += kLanes) {  // (n,) state row, contiguous
                        const int64_t width = std::min(kLanes, nstate - n0);
                        vf hv = load_tile(h + n0, width);
                        hv = vexp(dtv * load_tile(Ap + c * nstate + n0, width)) * hv + du * load_tile(Bp + b * b_sb + n0, width);
                        store_tile(h + n0, hv, width);
                        acc += hv * load_tile(Cp + b * c_sb + n0, width);
                    }
                    sum[r] = hsum(acc);
                }
                vf out = sum + dskip * uv;  // the D skip and the SiLU gate for the 16 rows at once
                if (zp != nullptr) out *= zv / (1.0f + vexp(-zv));
                for (int64_t r = 0; r < rows; r++) yp[i0 + r] = static_cast<T>(out[r]);  // y is (b, 1, d) contiguous
            }
        });
    });
    return y;
}
