// Matrix-vector products for decoding with int8 weights: y = (x W^T) * scale (+ bias) for a few
// rows of x (one per sequence of the batch), W int8 with a float32 scale per row.
//
// Decoding a token is bound by reading the weights once (a 130M model: 130 MB in int8), so the
// kernel streams W once whatever the number of rows of x: blocks of 8 rows of W, each read from
// memory for the first row of x and from L1 for the others, software-prefetched 4 KB ahead (7 GB/s
// without, 11-13 GB/s with: this machine's DRAM rate), each group of 16 weights widened to float32
// in registers (a sign-extending convert) and accumulated in float32. The blocks are split over
// ATen's thread pool. (bf16 weights go to torch's own kernel: ours, with the same structure,
// measured the same whole-model decode speed.)
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

constexpr int kBlockRows = 8;  // rows of W per block: read from memory once, then from L1 for each row of x
constexpr int64_t kPrefetch = 4096;  // software prefetch distance along W, in weights = bytes (past the end is harmless)

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

// x . w over k elements, float32 accumulation in four named vectors (four independent FMA chains;
// an array of accumulators was kept on the stack by GCC, every FMA then waiting on a store).
float dot(const float* x, const int8_t* w, int64_t k) {
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const int64_t body = k / (4 * kLanes) * (4 * kLanes);
    for (int64_t i = 0; i < body; i += 4 * kLanes) {
        __builtin_prefetch(w + i + kPrefetch);  // the 64-byte line this iteration's kPrefetch ahead: DRAM streams need a head start
        a0 += load16(x + i) * widen(w + i);
        a1 += load16(x + i + kLanes) * widen(w + i + kLanes);
        a2 += load16(x + i + 2 * kLanes) * widen(w + i + 2 * kLanes);
        a3 += load16(x + i + 3 * kLanes) * widen(w + i + 3 * kLanes);
    }
    float s = hsum((a0 + a1) + (a2 + a3));
    for (int64_t i = body; i < k; i++) s += x[i] * static_cast<float>(w[i]);
    return s;
}

// y (m, n) = x (m, k) @ w (n, k)^T * scale (+ bias): blocks of kBlockRows rows of W over ATen's
// thread pool; each block is streamed from memory once, for the first row of x.
void gemv(const float* x, int64_t m, int64_t k, const int8_t* w, int64_t n, const float* scale, const float* bias, float* y) {
    at::parallel_for(0, (n + kBlockRows - 1) / kBlockRows, 8, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = begin * kBlockRows; r0 < std::min(n, end * kBlockRows); r0 += kBlockRows) {
            const int64_t rows = std::min<int64_t>(kBlockRows, n - r0);
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = r0; r < r0 + rows; r++) {
                    float v = dot(x + i * k, w + r * k, k) * scale[r];
                    if (bias != nullptr) v += bias[r];
                    y[i * n + r] = v;
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
