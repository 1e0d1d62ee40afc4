// A decoded token in a few calls per layer instead of dozens of torch ops: the residual add +
// RMSNorm, and the whole mixer (in_proj, conv step, x_proj, dt_proj + softplus + the scan step,
// out_proj). At one token, each torch op or Python call costs more in dispatch than in arithmetic
// (a 130M model decodes 24 layers x ~20 of them: ~2.3 ms of a 14-20 ms token on a 2-core host).
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

namespace {

// One tile of a decode step: channels c0 .. c0+rows-1 (rows <= 16) of one sequence, whose u, z, B,
// C, state and y the pointers already address. dt = softplus(T(dt_low . dt_weight[c]) + bias[c]) as
// the unfused path rounds it (bias may be null), then for each channel its state row (n,), contiguous:
// h = exp(dt A) h + dt u B, y = <h, C> + D u, gated by silu(z). Per-channel values live in 16-lane
// vectors filled through small arrays (a vector lane chosen at run time is a store and a reload).
template <typename T>
void decode_tile(int64_t c0, int64_t rows, int64_t rank, int64_t nstate, const float* lowf, const T* wp, const float* bias,
                 const T* up, const T* zp, const T* Bp, const T* Cp, const float* Ap, const float* Dp, float* hp, T* yp) {
    alignas(64) float raw[kLanes] = {}, sums[kLanes] = {}, dts[kLanes];
    for (int64_t r = 0; r < rows; r++) {  // dt_proj: a dot product over the rank per channel
        const T* w = wp + (c0 + r) * rank;
        vf acc = {};
        for (int64_t j = 0; j < rank; j += kLanes) acc += load_tile(lowf + j, std::min(kLanes, rank - j)) * load_tile(w + j, std::min(kLanes, rank - j));
        raw[r] = static_cast<float>(static_cast<T>(hsum(acc))) + (bias != nullptr ? bias[c0 + r] : 0.0f);
    }
    const vf dt = vsoftplus(load16(raw));
    std::memcpy(dts, &dt, sizeof(dts));
    const vf u = load_tile(up + c0, rows);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t c = c0 + r;
        const float du = dts[r] * static_cast<float>(up[c0 + r]);
        float* h = hp + c * nstate;  // (n,)
        vf acc = {};
        for (int64_t n0 = 0; n0 < nstate; n0 += kLanes) {
            const int64_t width = std::min(kLanes, nstate - n0);
            vf hv = load_tile(h + n0, width);
            hv = vexp(dts[r] * load_tile(Ap + c * nstate + n0, width)) * hv + du * load_tile(Bp + n0, width);
            store_tile(h + n0, hv, width);
            acc += hv * load_tile(Cp + n0, width);
        }
        sums[r] = hsum(acc);
    }
    vf out = load16(sums);
    if (Dp != nullptr) out += load_tile(Dp + c0, rows) * u;
    if (zp != nullptr) {
        const vf zv = load_tile(zp + c0, rows);
        out *= vsilu(zv);
    }
    store_tile(yp + c0, out, rows);
}

}  // namespace

// y (b, 1, d) of one decode step from `state` (b, d, n) float32, updated in place: dt_proj, bias,
// softplus and the scan step in one pass over tiles of 16 channels (see decode_tile). Unlike the
// prompt scan (vectorised over 16 channels, the state read transposed, which a long prompt
// amortises), a step is vectorised over a channel's states: its state row is contiguous.
torch::Tensor decode_step(torch::Tensor u, torch::Tensor dt_low, torch::Tensor dt_weight, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                          c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                          torch::Tensor state) {
    TORCH_CHECK(u.dim() == 3 && u.size(1) == 1 && dt_low.stride(2) == 1, "decode_step takes one token: u (b, 1, d), dt_low (b, 1, r)");
    TORCH_CHECK(dt_weight.scalar_type() == dt_low.scalar_type() && dt_low.scalar_type() == u.scalar_type(), "dt_low, dt_weight and u must share a dtype");
    TORCH_CHECK(state.is_contiguous() && state.scalar_type() == torch::kFloat && A.is_contiguous() && A.scalar_type() == torch::kFloat,
                "A and state must be contiguous float32");
    TORCH_CHECK(B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type() && B.stride(2) == 1 && C.stride(2) == 1 && u.stride(2) == 1,
                "B and C must have u's dtype, and u, B, C unit stride on the last dimension");
    TORCH_CHECK(!z.has_value() || (z->scalar_type() == u.scalar_type() && z->stride(2) == 1), "z must have u's dtype and unit stride on d");
    const int64_t batch = u.size(0), dim = u.size(2), rank = dt_low.size(2), nstate = A.size(1);
    TORCH_CHECK(rank <= 256, "decode_step supports a dt rank up to 256");
    auto w = dt_weight.contiguous();
    auto bias = delta_bias.has_value() ? delta_bias->to(torch::kFloat).contiguous() : torch::Tensor();
    auto Dc = D.has_value() ? D->to(torch::kFloat).contiguous() : torch::Tensor();
    auto y = torch::empty({batch, 1, dim}, u.options());
    const int64_t tiles = (dim + kLanes - 1) / kLanes;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, u.scalar_type(), "decode_step", [&] {
        using T = scalar_t;
        const T* low = dt_low.data_ptr<T>();
        at::parallel_for(0, batch * tiles, 8, [&](int64_t begin, int64_t end) {
            float lowf[256];
            int64_t lowb = -1;  // the sequence whose dt_low is in lowf
            for (int64_t i = begin; i < end; i++) {
                const int64_t b = i / tiles, c0 = (i % tiles) * kLanes;
                if (b != lowb) {
                    for (int64_t j = 0; j < rank; j++) lowf[j] = static_cast<float>(low[b * dt_low.stride(0) + j]);
                    lowb = b;
                }
                decode_tile<T>(c0, std::min(kLanes, dim - c0), rank, nstate, lowf, w.data_ptr<T>(), delta_bias.has_value() ? bias.data_ptr<float>() : nullptr,
                               u.data_ptr<T>() + b * u.stride(0), z.has_value() ? z->data_ptr<T>() + b * z->stride(0) : nullptr,
                               B.data_ptr<T>() + b * B.stride(0), C.data_ptr<T>() + b * C.stride(0), A.data_ptr<float>(),
                               D.has_value() ? Dc.data_ptr<float>() : nullptr, state.data_ptr<float>() + b * dim * nstate, y.data_ptr<T>() + b * dim);
            }
        });
    });
    return y;
}

torch::Tensor linear_rows(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scale);
torch::Tensor causal_conv1d(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor conv_state);

// One decoded token through a mixer: hidden (b, 1, h) -> (b, 1, h), conv_state (b, d, k) and
// ssm_state (b, d, n) updated in place; the weights in the order of ops.reference.StepWeights
// (projections as in `linear_rows`, int8 ones with scales; conv_w (d, k)). The same ops, in the
// same order, as TorchOps.mixer_step.
torch::Tensor mixer_step(torch::Tensor hidden, torch::Tensor conv_state, torch::Tensor ssm_state, torch::Tensor in_w,
                         c10::optional<torch::Tensor> in_b, c10::optional<torch::Tensor> in_scale, torch::Tensor conv_w,
                         c10::optional<torch::Tensor> conv_b, torch::Tensor x_w, torch::Tensor dt_w, c10::optional<torch::Tensor> dt_b,
                         torch::Tensor A, c10::optional<torch::Tensor> D, torch::Tensor out_w, c10::optional<torch::Tensor> out_b,
                         c10::optional<torch::Tensor> out_scale) {
    const int64_t d = conv_w.size(0), rank = dt_w.size(1), n = A.size(1);
    auto xz = linear_rows(hidden, in_w, in_b, in_scale);  // (b, 1, 2d): x then the gate z
    auto x = causal_conv1d(xz.narrow(2, 0, d), conv_w, conv_b, conv_state);  // (b, 1, d)
    auto low = linear_rows(x, x_w, c10::nullopt, c10::nullopt);  // (b, 1, r + 2n): dt_low, B, C
    auto y = decode_step(x, low.narrow(2, 0, rank), dt_w, A, low.narrow(2, rank, n), low.narrow(2, rank + n, n), D, xz.narrow(2, d, d), dt_b,
                         ssm_state);  // (b, 1, d)
    return linear_rows(y, out_w, out_b, out_scale);
}

// One decoded token through the whole model in one call: tokens (b,) -> logits (b, vocab) float32,
// each layer's conv and SSM states (slices of conv_states (layers, b, d, k) and ssm_states
// (layers, b, d, n)) updated in place. The same C++ calls in the same order as the model's
// forward with this backend (so the same numbers), without its ~24 x 10 Python calls per token.
// `layers` holds, per layer, the norm weight followed by the 13 ops.reference.StepWeights entries
// (None where the model has none); embed_scale / head_scale are the int8 tables' row scales.
torch::Tensor model_step(torch::Tensor tokens, torch::Tensor embed, c10::optional<torch::Tensor> embed_scale,
                         std::vector<c10::optional<torch::Tensor>> layers, torch::Tensor conv_states, torch::Tensor ssm_states,
                         torch::Tensor norm_f, double eps, bool residual_fp32, torch::Tensor head_w, c10::optional<torch::Tensor> head_scale) {
    constexpr size_t kPerLayer = 14;
    TORCH_CHECK(layers.size() == kPerLayer * static_cast<size_t>(conv_states.size(0)), "model_step: ", kPerLayer, " entries per layer");
    const auto dtype = norm_f.scalar_type();
    auto hidden = embed.index_select(0, tokens);  // (b, h)
    if (embed_scale.has_value()) hidden = hidden.to(at::kFloat) * embed_scale->index_select(0, tokens).unsqueeze(1);
    hidden = hidden.to(dtype).unsqueeze(1);  // (b, 1, h)
    c10::optional<torch::Tensor> residual;
    for (int64_t i = 0; i < conv_states.size(0); i++) {
        const auto* w = &layers[i * kPerLayer];
        auto normed = add_rms_norm(hidden, residual, *w[0], eps, residual_fp32, true);
        residual = normed[1];
        hidden = mixer_step(normed[0], conv_states.select(0, i), ssm_states.select(0, i), *w[1], w[2], w[3], *w[4], w[5], *w[6], *w[7], w[8],
                            *w[9], w[10], *w[11], w[12], w[13]);
    }
    auto last = add_rms_norm(hidden, residual, norm_f, eps, residual_fp32, false)[0];  // (b, 1, h)
    return linear_rows(last, head_w, c10::nullopt, head_scale).to(at::kFloat).squeeze(1);  // (b, vocab)
}
