// Matrix-vector products for decoding with int8 weights: y = (x W^T) * scale (+ bias) for a few
// rows of x (one per sequence of the batch), W int8 with a float32 scale per row.
//
// Decoding a token is bound by reading the weights once (a 130M model: 130 MB in int8), so the
// kernel streams W exactly once whatever the number of rows of x: it takes W four rows at a time
// (prefetched a few rows ahead), widens each group of 16 weights to float32 in registers (a
// sign-extending convert) and multiplies it into every row of x, accumulating in float32. The rows
// of W are split over ATen's thread pool. (bf16 weights go to torch's own kernel, which uses
// AVX512-BF16 and measured faster here.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vec.h"

namespace {

using namespace mamba_cpu;

constexpr int kRows = 4;     // rows of W per step
constexpr int kPrefetchRows = 16;  // software prefetch distance, in rows of W (past the end is harmless)
constexpr int kMaxX = 2;     // rows of x per pass over a block of W (accumulators: kRows * kMaxX * 2)

// 16 int8 weights widened to float32 (with AVX-512: one sign extension and one convert; GCC's
// generic vector conversion of int8 is scalarised).
inline vf widen(const int8_t* p) {
#ifdef __AVX512F__
    return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#else
    vf out;
    for (int i = 0; i < kLanes; i++) out[i] = static_cast<float>(p[i]);
    return out;
#endif
}

inline float lanes_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < kLanes; i++) s += v[i];
    return s;
}

// out[m][r] = sum_k x[m][k] * w[r][k] for R rows of W at w and M rows of x. R and M are compile-time
// constants so that the R x M x 2 accumulators (two per pair, for twice the independent FMA chains)
// live in registers.
template <int M, int R>
void block(const float* x, int64_t k, const int8_t* w, float out[kMaxX][kRows]) {
    vf acc[M][R][2] = {};
    const int64_t body = k / (2 * kLanes) * (2 * kLanes);
    for (int64_t i = 0; i < body; i += 2 * kLanes) {
#pragma GCC unroll 2
        for (int half = 0; half < 2; half++) {
            vf xv[M];
#pragma GCC unroll 4
            for (int m = 0; m < M; m++) xv[m] = load16(x + m * k + i + half * kLanes);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                __builtin_prefetch(w + (r + kPrefetchRows) * k + i + half * kLanes);  // DRAM streams need a head start
                const vf wv = widen(w + r * k + i + half * kLanes);
#pragma GCC unroll 4
                for (int m = 0; m < M; m++) acc[m][r][half] += xv[m] * wv;
            }
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float s = lanes_sum(acc[m][r][0] + acc[m][r][1]);
            for (int64_t i = body; i < k; i++) s += x[m * k + i] * static_cast<float>(w[r * k + i]);
            out[m][r] = s;
        }
}

template <int R>
void rows_of_x(const float* x, int64_t xs, int64_t k, const int8_t* w, float out[kMaxX][kRows]) {
    if (xs == 1) block<1, R>(x, k, w, out);
    else block<2, R>(x, k, w, out);
}

void gemv(const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n, const float* scale, const float* bias, float* y) {
    at::parallel_for(0, (n + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
        float out[kMaxX][kRows];
        for (int64_t g = begin; g < end; g++) {
            const int64_t r0 = g * kRows;
            const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
            for (int64_t m0 = 0; m0 < m; m0 += kMaxX) {  // the block of W stays in cache for later rows of x
                const int64_t xs = std::min<int64_t>(kMaxX, m - m0);
                if (rows == kRows) {
                    rows_of_x<kRows>(x + m0 * k, xs, k, w + r0 * k, out);
                } else {  // the last rows of W, one at a time
                    float one[kMaxX][kRows];
                    for (int r = 0; r < rows; r++) {
                        rows_of_x<1>(x + m0 * k, xs, k, w + (r0 + r) * k, one);
                        for (int64_t i = 0; i < xs; i++) out[i][r] = one[i][0];
                    }
                }
                for (int64_t i = 0; i < xs; i++)
                    for (int r = 0; r < rows; r++) {
                        float v = out[i][r];
                        if (scale != nullptr) v *= scale[r0 + r];
                        if (bias != nullptr) v += bias[r0 + r];
                        y[(m0 + i) * n + r0 + r] = v;
                    }
            }
        }
    });
}

}  // namespace

// y (..., n) = x (..., k) @ weight (n, k)^T * scale (n,) (+ bias (n,)), in x's dtype; weight int8,
// scale float32. Meant for a few rows of x (decoding).
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor scale) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == torch::kChar, "weight must be a contiguous int8 (out, in) matrix");
    const int64_t n = weight.size(0), k = weight.size(1);
    TORCH_CHECK(x.size(-1) == k && scale.numel() == n, "x's last dimension must equal weight's in-features, scale one per out-feature");
    auto xf = x.reshape({-1, k}).to(torch::kFloat).contiguous();  // (m, k)
    auto y = torch::empty({xf.size(0), n}, xf.options());
    auto sf = scale.to(torch::kFloat).contiguous();
    torch::Tensor bf = bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
    gemv(xf.data_ptr<float>(), xf.size(0), k, weight.data_ptr<int8_t>(), n, sf.data_ptr<float>(), bias.has_value() ? bf.data_ptr<float>() : nullptr,
         y.data_ptr<float>());
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    return y.to(x.scalar_type()).reshape(sizes);
}
