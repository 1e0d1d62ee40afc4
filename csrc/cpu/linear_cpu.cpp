// Matrix-vector products for decoding: y = x W^T (* scale) (+ bias) for a few rows of x (one per
// sequence of the batch), W float32, bfloat16, or int8 with a float32 scale per output row.
//
// Decoding a token is bound by reading the weights once (a 130M model: 517 MB in float32, 258 MB
// in bf16, 130 MB in int8), so the kernel streams each row of W once whatever the number of rows
// of x (the row, 0.8-6 KB, is read from memory for the first row of x and from L1 for the others).
// Rows are split over ATen's thread pool in contiguous ranges, one sequential stream per thread,
// software-prefetched 8 KB ahead into L2: on the 2-core Intel host that took a stream of bf16 or
// int8 weights from 13-19 GB/s (hardware prefetch only) to 25-35 GB/s (benchmarks in
// docs/perf-notes.md). The arithmetic is in float32:
//   float32 W: x . w by FMAs on 16 lanes;
//   bf16 W (x bf16): with AVX512-BF16, vdpbf16ps (32 products per instruction, exact products,
//     float32 sums), otherwise each bf16 widened to float32 (a shift);
//   int8 W: with float32 x, 16 weights sign-extended and converted to float32 per FMA; with 16-bit
//     x, x quantized to int16 per row and 32 weights per AVX512-VNNI vpdpwssd (blocks.h: dot_q);
//     the row's scale (and x's) applied to the sum.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "blocks.h"

namespace {

using namespace mamba_cpu;
using c10::BFloat16;

// y (m, n) = x (m, k) @ w (n, k)^T (* scale) (+ bias), rows of W in contiguous ranges per thread.
template <typename X, typename W, typename Y>
void gemv(const X* x, int64_t m, int64_t k, const W* w, int64_t n, const float* scale, const float* bias, Y* y, const float* x_scale = nullptr) {
    const int64_t grain = std::max<int64_t>(1, 16384 / k);  // at least ~16 KB of W per task
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { gemv_range(x, m, k, w, n, scale, bias, y, begin, end, x_scale); });
}

}  // namespace

// y (..., n) = x (..., k) @ weight (n, k)^T (* scale (n,)) (+ bias (n,)), in x's dtype, for a few
// rows of x (decoding). weight: float32 or bf16 (x of the same dtype), or int8 with float32 scales.
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scale) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (out, in) matrix");
    const int64_t n = weight.size(0), k = weight.size(1);
    const bool int8 = weight.scalar_type() == torch::kChar;
    TORCH_CHECK(x.size(-1) == k, "x's last dimension must equal weight's in-features");
    TORCH_CHECK(int8 == scale.has_value(), "scale goes with an int8 weight, and only with one");
    TORCH_CHECK(int8 || weight.scalar_type() == x.scalar_type(), "a float weight must have x's dtype");
    TORCH_CHECK(!int8 || scale->numel() == n, "scale must have one value per out-feature");
    auto x2 = x.reshape({-1, k});  // (m, k)
    auto xin = (int8 ? x2.to(torch::kFloat) : x2).contiguous();
    auto y = torch::empty({x2.size(0), n}, xin.options());
    auto sf = int8 ? scale->to(torch::kFloat).contiguous() : torch::Tensor();
    auto bf = bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
    const float* sp = int8 ? sf.data_ptr<float>() : nullptr;
    const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
    const int64_t m = x2.size(0);
    if (int8 && x.scalar_type() != torch::kFloat) {  // 16-bit activations: quantized to int16 rows
        auto q = torch::empty({m, k}, x.options().dtype(torch::kShort));
        auto q_scale = torch::empty({m}, xin.options());
        quantize_rows(xin.data_ptr<float>(), m, k, q.data_ptr<int16_t>(), q_scale.data_ptr<float>());
        gemv(q.data_ptr<int16_t>(), m, k, weight.data_ptr<int8_t>(), n, sp, bp, y.data_ptr<float>(), q_scale.data_ptr<float>());
    } else if (int8) {
        gemv(xin.data_ptr<float>(), m, k, weight.data_ptr<int8_t>(), n, sp, bp, y.data_ptr<float>());
    } else if (weight.scalar_type() == torch::kFloat) {
        gemv(xin.data_ptr<float>(), m, k, weight.data_ptr<float>(), n, sp, bp, y.data_ptr<float>());
    } else {
        TORCH_CHECK(weight.scalar_type() == torch::kBFloat16, "weight must be float32, bfloat16 or int8");
        gemv(xin.data_ptr<BFloat16>(), m, k, weight.data_ptr<BFloat16>(), n, sp, bp, y.data_ptr<BFloat16>());
    }
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    return y.to(x.scalar_type()).reshape(sizes);
}

// weight (n, k) int8 * scale (n,) in `dtype` (float32 or bf16): the torch path's
// (weight.float() * scale[:, None]).to(dtype), bit for bit (one float32 product, then the same
// rounding), in one parallel pass instead of three. Prompts with int8 weights dequantize each
// projection per call; torch's three passes were ~30% of an int8 pp512 forward (perf notes, CPU 28).
torch::Tensor dequantize_rows(torch::Tensor weight, torch::Tensor scale, at::ScalarType dtype) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == torch::kChar, "weight must be a contiguous int8 (out, in) matrix");
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0), "scale must be float32, one per row");
    TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
    const int64_t n = weight.size(0), k = weight.size(1);
    auto out = torch::empty({n, k}, weight.options().dtype(dtype));
    const int8_t* q = weight.data_ptr<int8_t>();
    const float* s = scale.data_ptr<float>();
    auto run = [&](auto* o) {
        using T = std::remove_pointer_t<decltype(o)>;
        at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; r++) {
                const int8_t* row = q + r * k;
                T* dst = o + r * k;
                int64_t j = 0;
                for (; j + kLanes <= k; j += kLanes) store_tile(dst + j, widen(row + j) * s[r], kLanes);
                for (; j < k; j++) dst[j] = static_cast<T>(static_cast<float>(row[j]) * s[r]);
            }
        });
    };
    if (dtype == torch::kFloat) run(out.data_ptr<float>()); else run(out.data_ptr<BFloat16>());
    return out;
}
