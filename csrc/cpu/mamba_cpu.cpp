// CPU kernels for Mamba: the selective scan and the causal depthwise conv, with carried state.
//
// Dimension glossary: b batch, l length, d inner channels, n state size, k conv kernel.
// Layouts are channels-last as the projections produce them: u, dt, z (b, l, d); B, C (b, l, n),
// with any strides on the b and l dimensions and unit stride on the last (so the views that
// in_proj(...).chunk() and x_proj(...).split() return are read in place, never copied).
//
// Work is split over (batch x tiles of 16 channels) with ATen's thread pool. Inside a tile the
// sequence is walked once; the state h (n x 16 floats) stays in registers/L1, the loops over the
// 16 channels are one vector value (GCC vector extensions: one AVX-512 or two AVX2 registers),
// and exp is a polynomial on those vectors (about 1 ulp: vec.h).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "blocks.h"

namespace {

using namespace mamba_cpu;

constexpr int64_t kTile = kLanes;  // channels per work item
constexpr int64_t kAhead = 16;      // software prefetch distance, in time steps

// Strided view of a (b, l, c) tensor with unit stride on c.
template <typename T>
struct View3 {
    T* data;
    int64_t sb, sl;
    T* row(int64_t b, int64_t t) const { return data + b * sb + t * sl; }
};

template <typename T>
View3<T> view3(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "expected a (b, l, c) tensor with unit stride on c");
    return {x.data_ptr<T>(), x.stride(0), x.stride(1)};
}

// p[0, n) as float32: p itself, or (16-bit inputs) widened into buf once, so that the scan's
// broadcasts of B and C are loads (a conversion at each use was a scalar convert and a shuffle).
template <typename T>
const float* as_f32(const T* p, int64_t n, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
        return p;
    } else {
        for (int64_t n0 = 0; n0 < n; n0 += kLanes) store_tile(buf + n0, load_tile(p + n0, std::min(kLanes, n - n0)), std::min(kLanes, n - n0));
        return buf;
    }
}

// One tile of 16 channels of one sequence over the whole chunk; dt = softplus(delta + bias) in
// float32 per step (one vector softplus per 16 channels, next to 16 vector exps for the states).
// NS: the state size when known at compile time (16, every published Mamba: the loop over states
// unrolled, the state in registers), else 0 (any size, the state in memory).
template <int NS, typename scalar_t, typename delta_t>
void scan_tile(int64_t b, int64_t c0, int64_t length, int64_t dim, int64_t nstate_any,
               const View3<scalar_t>& u, const View3<delta_t>& delta, const float* delta_bias, const View3<scalar_t>& Bm, const View3<scalar_t>& Cm,
               const View3<scalar_t>* z, const float* A, const float* D, float* state, const View3<scalar_t>& y) {
    const int64_t nstate = NS > 0 ? NS : nstate_any;
    const int64_t width = std::min(kTile, dim - c0);
    const vf bias = delta_bias != nullptr ? load_tile(delta_bias + c0, width) : vf{};
    std::conditional_t<(NS > 0), std::array<vf, NS>, std::vector<vf>> h{}, a{};  // per state index: 16 channels
    std::conditional_t<(NS > 0), std::array<float, NS>, std::vector<float>> bw{}, cw{};  // B, C of a step widened
    if constexpr (NS == 0) h.resize(nstate), a.resize(nstate), bw.resize(nstate), cw.resize(nstate);
    for (int64_t n = 0; n < nstate; n++)
        for (int64_t c = 0; c < width; c++) {
            a[n][c] = A[(c0 + c) * nstate + n] * kLog2e;  // the decays as powers of 2 (vexp2_decay)
            h[n][c] = state[(b * dim + c0 + c) * nstate + n];
        }
    const vf dskip = D != nullptr ? load_tile(D + c0, width) : vf{};
    for (int64_t t = 0; t < length; t++) {
        if (t + kAhead < length) {  // rows are pages apart: the hardware prefetcher does not follow
            __builtin_prefetch(u.row(b, t + kAhead) + c0);
            __builtin_prefetch(delta.row(b, t + kAhead) + c0);
            __builtin_prefetch(Bm.row(b, t + kAhead));
            __builtin_prefetch(Cm.row(b, t + kAhead));
            if (z != nullptr) __builtin_prefetch(z->row(b, t + kAhead) + c0);
        }
        const vf uv = load_tile(u.row(b, t) + c0, width);
        const vf dtv = softplus_for<scalar_t>(load_tile(delta.row(b, t) + c0, width) + bias);
        const vf du = dtv * uv;
        vf acc = {};
        const float* br = as_f32(Bm.row(b, t), nstate, bw.data());  // (n,) for the broadcasts below
        const float* cr = as_f32(Cm.row(b, t), nstate, cw.data());
#pragma GCC unroll 16
        for (int64_t n = 0; n < nstate; n++) {
            h[n] = vexp2_decay(dtv * a[n]) * h[n] + du * br[n];
            acc += h[n] * cr[n];
        }
        vf out = acc + dskip * uv;
        if (z != nullptr) {
            const vf zv = load_tile(z->row(b, t) + c0, width);
            out *= silu_for<scalar_t>(zv);
        }
        store_tile(y.row(b, t) + c0, out, width);
    }
    for (int64_t n = 0; n < nstate; n++)
        for (int64_t c = 0; c < width; c++) state[(b * dim + c0 + c) * nstate + n] = h[n][c];
}

}  // namespace

// y = selective scan of u with step sizes dt = softplus(delta + delta_bias) (delta in u's dtype or
// float32, the bias optional, both added in float32), continuing from `state` (b, d, n) float32,
// which is overwritten with the final state. D and z are optional.
torch::Tensor selective_scan(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                             c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                             torch::Tensor state) {
    TORCH_CHECK(A.scalar_type() == torch::kFloat && state.scalar_type() == torch::kFloat, "A and state must be float32");
    TORCH_CHECK(delta.scalar_type() == u.scalar_type() || delta.scalar_type() == torch::kFloat, "delta must have u's dtype or float32");
    TORCH_CHECK(B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type(), "u, B and C must share a dtype");
    TORCH_CHECK(A.is_contiguous() && state.is_contiguous(), "A and state must be contiguous");
    const int64_t batch = u.size(0), length = u.size(1), dim = u.size(2), nstate = A.size(1);
    TORCH_CHECK(state.size(0) == batch && state.size(1) == dim && state.size(2) == nstate, "state must be (b, d, n)");
    auto y = torch::empty({batch, length, dim}, u.options());
    torch::Tensor Dc = D.has_value() ? D->to(torch::kFloat).contiguous() : torch::Tensor();
    torch::Tensor bias = delta_bias.has_value() ? delta_bias->to(torch::kFloat).contiguous() : torch::Tensor();
    const int64_t tiles = (dim + kTile - 1) / kTile;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, u.scalar_type(), "selective_scan", [&] {
        const auto uv = view3<scalar_t>(u), yv = view3<scalar_t>(y), bv = view3<scalar_t>(B), cv = view3<scalar_t>(C);
        View3<scalar_t> zv{};
        if (z.has_value()) {
            TORCH_CHECK(z->scalar_type() == u.scalar_type(), "z must have u's dtype");
            zv = view3<scalar_t>(*z);
        }
        const float* Dp = D.has_value() ? Dc.data_ptr<float>() : nullptr;
        const float* bp = delta_bias.has_value() ? bias.data_ptr<float>() : nullptr;
        auto run = [&](auto delta_zero) {
            using delta_t = decltype(delta_zero);
            const auto dv = view3<delta_t>(delta);
            auto tile = nstate == 16 ? scan_tile<16, scalar_t, delta_t> : scan_tile<0, scalar_t, delta_t>;
            at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; i++)
                    tile(i / tiles, (i % tiles) * kTile, length, dim, nstate, uv, dv, bp, bv, cv, z.has_value() ? &zv : nullptr, A.data_ptr<float>(),
                         Dp, state.data_ptr<float>(), yv);
            });
        };
        if (delta.scalar_type() == torch::kFloat) run(0.0f); else run(scalar_t(0));
    });
    return y;
}

template <typename T>
void conv_step(const T* x, int64_t x_sb, const T* weight, const T* bias, T* state, T* y, int64_t batch, int64_t dim, int64_t kernel) {
    at::parallel_for(0, batch * dim, 512, [&](int64_t begin, int64_t end) { conv_step_range(x, x_sb, weight, bias, state, y, dim, kernel, begin, end); });
}

// silu(causal depthwise conv of x (b, l, d) with weight (d, k)), continuing from conv_state
// (b, d, k) (the last k inputs, newest last), which is overwritten with the new last k inputs.
namespace {

// One tile of 16 channels of one sequence over the chunk: y = silu(bias + sum_j w_j x_{t-k+1+j}),
// continuing from the conv state st (b, d, k), oldest first, which is overwritten with the last k
// inputs. K: the kernel size when known at compile time (the window then lives in registers), else 0.
template <int K, typename T>
void conv_tile(int64_t b, int64_t c0, int64_t length, int64_t dim, int64_t kernel_any, const View3<T>& x, const float* wp, const float* bp,
               T* st, const View3<T>& y) {
    const int64_t kernel = K > 0 ? K : kernel_any, width = std::min(kTile, dim - c0);
    std::conditional_t<(K > 0), std::array<vf, K>, std::vector<vf>> window{}, weights{};  // per tap: 16 channels; window oldest first
    if constexpr (K == 0) window.resize(kernel), weights.resize(kernel);
    for (int64_t j = 0; j < kernel; j++)
        for (int64_t c = 0; c < kTile; c++) {
            window[j][c] = c < width ? static_cast<float>(st[(b * dim + c0 + c) * kernel + j]) : 0.0f;
            weights[j][c] = c < width ? wp[(c0 + c) * kernel + j] : 0.0f;
        }
    const vf bv = load_tile(bp + c0, width);
    for (int64_t t = 0; t < length; t++) {
        if (t + kAhead < length) __builtin_prefetch(x.row(b, t + kAhead) + c0);  // as in the scan
        for (int64_t j = 0; j + 1 < kernel; j++) window[j] = window[j + 1];
        window[kernel - 1] = load_tile(x.row(b, t) + c0, width);
        vf acc = bv;
        for (int64_t j = 0; j < kernel; j++) acc += window[j] * weights[j];
        store_tile(y.row(b, t) + c0, vsilu(acc), width);
    }
    for (int64_t j = 0; j < kernel; j++)
        for (int64_t c = 0; c < width; c++) st[(b * dim + c0 + c) * kernel + j] = static_cast<T>(window[j][c]);
}

}  // namespace

torch::Tensor causal_conv1d(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor conv_state) {
    const int64_t batch = x.size(0), length = x.size(1), dim = x.size(2), kernel = weight.size(1);
    TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type(), "conv_state must be contiguous, x's dtype");
    if (length == 1 && x.stride(2) == 1 && weight.is_contiguous() && weight.scalar_type() == x.scalar_type() &&
        (!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == x.scalar_type()))) {
        auto y = torch::empty({batch, 1, dim}, x.options());
        AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "conv_step", [&] {
            conv_step<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), weight.data_ptr<scalar_t>(),
                                          bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, conv_state.data_ptr<scalar_t>(),
                                          y.data_ptr<scalar_t>(), batch, dim, kernel);
        });
        return y;
    }
    auto w = weight.to(torch::kFloat).contiguous();
    auto bf = bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::zeros({dim}, x.options().dtype(torch::kFloat));
    auto y = torch::empty({batch, length, dim}, x.options());
    const int64_t tiles = (dim + kTile - 1) / kTile;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "causal_conv1d", [&] {
        const auto xv = view3<scalar_t>(x), yv = view3<scalar_t>(y);
        scalar_t* st = conv_state.data_ptr<scalar_t>();
        const float* wp = w.data_ptr<float>();
        const float* bp = bf.data_ptr<float>();
        auto run = [&](auto taps) {  // the kernel size when known at compile time (2..4), else 0
            at::parallel_for(0, batch * tiles, 1, [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; i++)
                    conv_tile<decltype(taps)::value>(i / tiles, (i % tiles) * kTile, length, dim, kernel, xv, wp, bp, st, yv);
            });
        };
        switch (kernel) {
            case 2: run(std::integral_constant<int, 2>()); break;
            case 3: run(std::integral_constant<int, 3>()); break;
            case 4: run(std::integral_constant<int, 4>()); break;
            default: run(std::integral_constant<int, 0>()); break;
        }
    });
    return y;
}

// How many threads a parallel_for over many items runs on: torch's thread count when built with
// OpenMP, 1 without (ATen's parallel_for then runs serially). A test guards the build flags with it.
int64_t parallel_threads() {
    std::atomic<uint64_t> seen{0};
    at::parallel_for(0, 1 << 12, 1, [&](int64_t, int64_t) { seen.fetch_or(uint64_t{1} << std::min(at::get_thread_num(), 63)); });
    return __builtin_popcountll(seen.load());
}

// linear_cpu.cpp, decode_cpu.cpp
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scale);
torch::Tensor dequantize_rows(torch::Tensor weight, torch::Tensor scale, at::ScalarType dtype);
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps,
                                        bool residual_fp32, bool cast_input);
torch::Tensor decode_step(torch::Tensor u, torch::Tensor dt_low, torch::Tensor dt_weight, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                          c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                          torch::Tensor state);
torch::Tensor mixer_step(torch::Tensor hidden, torch::Tensor conv_state, torch::Tensor ssm_state, torch::Tensor in_w,
                         c10::optional<torch::Tensor> in_b, c10::optional<torch::Tensor> in_scale, torch::Tensor conv_w,
                         c10::optional<torch::Tensor> conv_b, torch::Tensor x_w, torch::Tensor dt_w, c10::optional<torch::Tensor> dt_b,
                         torch::Tensor A, c10::optional<torch::Tensor> D, torch::Tensor out_w, c10::optional<torch::Tensor> out_b,
                         c10::optional<torch::Tensor> out_scale);
torch::Tensor model_step(torch::Tensor tokens, torch::Tensor embed, c10::optional<torch::Tensor> embed_scale,
                         std::vector<c10::optional<torch::Tensor>> layers, torch::Tensor conv_states, torch::Tensor ssm_states,
                         torch::Tensor norm_f, double eps, bool residual_fp32, torch::Tensor head_w, c10::optional<torch::Tensor> head_scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("selective_scan", &selective_scan, "selective scan with carried state (CPU)");
    m.def("causal_conv1d", &causal_conv1d, "causal depthwise conv + SiLU with carried state (CPU)");
    m.def("linear_rows", &linear_rows, "x @ W^T (* scale) for a few rows of x, W float32, bf16 or int8 (CPU)");
    m.def("dequantize_rows", &dequantize_rows, "int8 (out, in) * scale (out,) as float32 or bf16 (CPU)");
    m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm (CPU)");
    m.def("decode_step", &decode_step, "dt_proj + softplus + one selective-scan step (CPU)");
    m.def("mixer_step", &mixer_step, "one decoded token through a mixer (CPU)");
    m.def("model_step", &model_step, "one decoded token through the whole model: tokens -> logits (CPU)");
    m.def("parallel_threads", &parallel_threads, "threads a parallel_for uses (1 without OpenMP)");
}
