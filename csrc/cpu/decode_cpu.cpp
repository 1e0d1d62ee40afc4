// The non-matmul ops of a decoded token as single calls: the residual add + RMSNorm, and the decode
// step (dt_proj + softplus + the scan step). model_cpu.cpp runs them, with the projections, as
// whole mixers and whole tokens.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../norm_tensors.h"
#include "blocks.h"

namespace {

using namespace mamba_cpu;

template <typename T, typename R>
void add_rms_norm_rows(const T* x, const R* residual, const T* weight, T* out, R* res_out, int64_t rows, int64_t h, float eps, bool cast_input) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) { add_rms_norm_range(x, residual, weight, out, res_out, h, eps, cast_input, begin, end); });
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
        const StepRows<T> in{u.data_ptr<T>(), z.has_value() ? z->data_ptr<T>() : nullptr, dt_low.data_ptr<T>(), B.data_ptr<T>(), C.data_ptr<T>(),
                             u.stride(0), z.has_value() ? z->stride(0) : 0, dt_low.stride(0), B.stride(0), C.stride(0)};
        at::parallel_for(0, batch * tiles, 8, [&](int64_t begin, int64_t end) {
            decode_tiles(begin, end, dim, rank, nstate, in, w.data_ptr<T>(), delta_bias.has_value() ? bias.data_ptr<float>() : nullptr, A.data_ptr<float>(),
                         D.has_value() ? Dc.data_ptr<float>() : nullptr, state.data_ptr<float>(), y.data_ptr<T>());
        });
    });
    return y;
}
