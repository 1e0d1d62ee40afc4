// Matrix-vector products for decoding with low-precision weights: y = x W^T (+ bias) for a few
// rows of x (one per sequence of the batch), W bfloat16 or int8 with a float32 scale per row.
//
// Decoding a token is bound by reading the weights once (a 130M model: 258 MB in bf16, 130 MB in
// int8), so the kernel streams W exactly once whatever the number of rows of x: it takes W four
// rows at a time, widens each group of 16 weights to float32 in registers (bf16: a 16-bit shift;
// int8: a sign-extending convert) and multiplies it into every row of x, accumulating in float32.
// The rows of W are split over ATen's thread pool. Exact products (no rounding of x to bf16).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kLanes = 16;
constexpr int kRows = 4;     // rows of W per step
constexpr int kMaxX = 4;     // rows of x per pass over a block of W (accumulators: kRows * kMaxX)
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef int8_t vb __attribute__((vector_size(kLanes * sizeof(int8_t))));

inline vf widen(const c10::BFloat16* p) {
    vh h;
    std::memcpy(&h, p, sizeof(h));
    const vu bits = __builtin_convertvector(h, vu) << 16;  // bf16 is the top half of a float32
    vf out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

inline vf widen(const int8_t* p) {
    vb q;
    std::memcpy(&q, p, sizeof(q));
    return __builtin_convertvector(q, vf);
}

inline float widen1(c10::BFloat16 v) { return static_cast<float>(v); }
inline float widen1(int8_t v) { return static_cast<float>(v); }

inline float lanes_sum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < kLanes; i++) s += v[i];
    return s;
}

// out[m][r] = sum_k x[m][k] * w[r][k] for the `rows` (<= kRows) rows of W at w and M rows of x.
template <typename W, int M>
void block(const float* x, int64_t k, const W* w, int rows, float out[kMaxX][kRows]) {
    vf acc[M][kRows] = {};
    const int64_t body = k / kLanes * kLanes;
    for (int64_t i = 0; i < body; i += kLanes) {
        vf xv[M];
        for (int m = 0; m < M; m++) std::memcpy(&xv[m], x + m * k + i, sizeof(vf));
        for (int r = 0; r < kRows; r++) {
            if (r >= rows) break;
            const vf wv = widen(w + r * k + i);
            for (int m = 0; m < M; m++) acc[m][r] += xv[m] * wv;
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < rows; r++) {
            float s = lanes_sum(acc[m][r]);
            for (int64_t i = body; i < k; i++) s += x[m * k + i] * widen1(w[r * k + i]);
            out[m][r] = s;
        }
}

template <typename W>
void rows_of_x(const float* x, int64_t xs, int64_t k, const W* w, int rows, float out[kMaxX][kRows]) {
    switch (xs) {
        case 1: block<W, 1>(x, k, w, rows, out); break;
        case 2: block<W, 2>(x, k, w, rows, out); break;
        case 3: block<W, 3>(x, k, w, rows, out); break;
        default: block<W, 4>(x, k, w, rows, out); break;
    }
}

template <typename W>
void gemv(const float* x, int64_t m, int64_t k, const W* w, int64_t n, const float* scale, const float* bias, float* y) {
    at::parallel_for(0, (n + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
        float out[kMaxX][kRows];
        for (int64_t g = begin; g < end; g++) {
            const int64_t r0 = g * kRows;
            const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
            for (int64_t m0 = 0; m0 < m; m0 += kMaxX) {  // the block of W stays in cache for later rows of x
                const int64_t xs = std::min<int64_t>(kMaxX, m - m0);
                rows_of_x(x + m0 * k, xs, k, w + r0 * k, rows, out);
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

// y (..., n) = x (..., k) @ weight (n, k)^T (* scale (n,)) (+ bias (n,)), in x's dtype; weight is
// bfloat16, or int8 with float32 `scale`. Meant for a few rows of x (decoding).
torch::Tensor linear_lowp(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scale) {
    TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous (out, in) matrix");
    const int64_t n = weight.size(0), k = weight.size(1);
    TORCH_CHECK(x.size(-1) == k, "x's last dimension must equal weight's in-features");
    const bool int8 = weight.scalar_type() == torch::kChar;
    TORCH_CHECK(int8 || weight.scalar_type() == torch::kBFloat16, "weight must be bfloat16 or int8");
    TORCH_CHECK(int8 == scale.has_value(), "an int8 weight needs float32 scales, a bfloat16 one none");
    auto xf = x.reshape({-1, k}).to(torch::kFloat).contiguous();  // (m, k)
    auto y = torch::empty({xf.size(0), n}, xf.options());
    torch::Tensor sf = int8 ? scale->to(torch::kFloat).contiguous() : torch::Tensor();
    torch::Tensor bf = bias.has_value() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
    const float* sp = int8 ? sf.data_ptr<float>() : nullptr;
    const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
    if (int8)
        gemv(xf.data_ptr<float>(), xf.size(0), k, weight.data_ptr<int8_t>(), n, sp, bp, y.data_ptr<float>());
    else
        gemv(xf.data_ptr<float>(), xf.size(0), k, weight.data_ptr<c10::BFloat16>(), n, sp, bp, y.data_ptr<float>());
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    return y.to(x.scalar_type()).reshape(sizes);
}
