// Products of 1..64 rows on tensor cores for the extension (ops.h; kernel in rows_gemm.cuh).
#include "launch.cuh"
#include "rows_gemm.cuh"

using namespace mamba;

namespace {

// Checks x and weight for rows_gemm_kernel: 1..64 contiguous rows of 16-bit x, weight (n, k)
// contiguous in x's dtype, k a multiple of 8, both 16-byte aligned. Returns the rows.
int64_t check_rows(const at::Tensor& x, const at::Tensor& weight, const char* name) {
    const int64_t k = x.size(-1), m = x.numel() / k;
    const auto type = x.scalar_type();
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (type == at::kBFloat16 || type == at::kHalf) && weight.scalar_type() == type &&
                weight.is_contiguous() && weight.size(1) == k && k % 8 == 0 && m >= 1 && m <= 64 && aligned(x.data_ptr(), 16) &&
                aligned(weight.data_ptr(), 16),
                name, ": 1..64 contiguous rows of bf16/fp16 x, weight (n, k) contiguous in x's dtype, k a multiple of 8, 16-byte aligned");
    return m;
}

// Launches rows_gemm_kernel<T, MT, COLS, K> (early, in clusters of split.splits blocks).
template <typename T, int MT, int COLS, int K>
void launch_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, T* y, int64_t m, int64_t n, GemmSplit split,
                  ConvArgs conv) {
    const auto* props = at::cuda::getCurrentDeviceProperties();
    const size_t smem = gemm_smem(MT, COLS, split, sizeof(T), K);
    TORCH_CHECK(props->major >= 9 && smem + 64 <= props->sharedMemPerBlockOptin, "rows_gemm needs sm_90+ and k <= ~6000 (", smem,
                " bytes of shared memory for k = ", x.size(-1), ")");
    auto kernel = rows_gemm_kernel<T, MT, COLS, K>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));  // above 48 KB
    const dim3 grid(split.splits, static_cast<unsigned>((n + COLS - 1) / COLS));
    launch_with(kernel, grid, kGemmThreads, smem, at::cuda::getCurrentCUDAStream(), true, split.splits, static_cast<const T*>(x.data_ptr()),
                static_cast<const T*>(weight.data_ptr()), bias.defined() ? static_cast<const T*>(bias.data_ptr()) : nullptr, y,
                static_cast<int>(m), static_cast<int>(n), static_cast<int>(x.size(-1)), split.slice, conv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for 1..64 rows of 16-bit x on sm_90+ (tensor
// cores, clusters; see rows_gemm.cuh). Needs k % 8 == 0 and 16-byte aligned, contiguous x and weight.
// splits: blocks per cluster, each over a slice of k (0: the kernel's choice; the microbenchmark tries others);
// cols: output columns per cluster, 64 (a warp per 16 columns), 32, or 16 (a warp per 16 rows: narrow weights).
at::Tensor rows_gemm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t splits, int64_t cols) {
    const int64_t m = check_rows(x, weight, "rows_gemm"), n = weight.size(0);
    TORCH_CHECK(cols == 16 || cols == 32 || cols == 64, "rows_gemm: cols 16, 32 or 64");
    const c10::cuda::CUDAGuard guard(x.device());
    const GemmSplit split = gemm_split(static_cast<int>(x.size(-1)), static_cast<int>(splits));
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    auto y = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        if constexpr (!std::is_same_v<T, float>) {
            auto launch = [&](auto tiles) {
                constexpr int MT = decltype(tiles)::value;
                T* out = static_cast<T*>(y.data_ptr());
                if (cols == 16) launch_tiles<T, MT, 16, 0>(x, weight, bc, out, m, n, split, ConvArgs{});
                else if (cols == 32) launch_tiles<T, MT, 32, 0>(x, weight, bc, out, m, n, split, ConvArgs{});
                else launch_tiles<T, MT, 64, 0>(x, weight, bc, out, m, n, split, ConvArgs{});
            };
            switch ((m + 15) / 16) {
                case 1: launch(std::integral_constant<int, 1>()); break;
                case 2: launch(std::integral_constant<int, 2>()); break;
                case 3: launch(std::integral_constant<int, 3>()); break;
                default: launch(std::integral_constant<int, 4>()); break;
            }
        }
    });
    return y;
}

// One decoded token's in_proj and conv step for 1..64 rows, the conv in the product's epilogue:
// x_c, z = x (..., k) @ weight (2d, k)^T (+ bias); returns (silu(conv step of x_c), z), each (..., d).
// conv_state (rows, d, K) contiguous in x's dtype, updated in place; d a multiple of 32 (a block's 32
// columns are whole channels), K 2..4; one block per 32 columns over the whole of k (k <= ~1000).
std::vector<at::Tensor> rows_gemm_conv(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor conv_weight,
                                       c10::optional<at::Tensor> conv_bias, at::Tensor conv_state) {
    constexpr int kCols = 32;
    const int64_t m = check_rows(x, weight, "rows_gemm_conv"), dim = weight.size(0) / 2, kernel = conv_weight.size(-1);
    TORCH_CHECK(dim % kCols == 0 && weight.size(0) == 2 * dim && kernel >= 2 && kernel <= 4 && conv_weight.numel() == dim * kernel &&
                conv_state.scalar_type() == x.scalar_type() && conv_state.is_contiguous() && conv_state.numel() == m * dim * kernel &&
                aligned(conv_state.data_ptr(), 16),
                "rows_gemm_conv: weight (2d, k) with d a multiple of 32, conv kernel 2..4, conv_state (rows, d, kernel) contiguous in x's dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    auto sizes = x.sizes().vec();
    sizes.back() = dim;
    auto u = at::empty(sizes, x.options()), z = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
    auto w = conv_weight.to(x.scalar_type()).contiguous();
    at::Tensor cb = conv_bias.has_value() ? conv_bias->to(x.scalar_type()).contiguous() : at::Tensor();
    ConvArgs conv{nullptr, w.data_ptr(), conv_bias.has_value() ? cb.data_ptr() : nullptr, conv_state.data_ptr(), u.data_ptr(), 0, 0, 1,
                  static_cast<int>(dim), static_cast<int>(kernel)};
    const GemmSplit split = gemm_split(static_cast<int>(x.size(-1)), 1);
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        if constexpr (!std::is_same_v<T, float>) {
            T* out = static_cast<T*>(z.data_ptr());
            switch (kernel) {  // 4 row tiles always: the path of 17..64 rows
                case 2: launch_tiles<T, 4, kCols, 2>(x, weight, bc, out, m, 2 * dim, split, conv); break;
                case 3: launch_tiles<T, 4, kCols, 3>(x, weight, bc, out, m, 2 * dim, split, conv); break;
                default: launch_tiles<T, 4, kCols, 4>(x, weight, bc, out, m, 2 * dim, split, conv); break;
            }
        }
    });
    return {u, z};
}
