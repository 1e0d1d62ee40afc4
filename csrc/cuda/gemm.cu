// Products of 1..64 rows on tensor cores for the extension (ops.h; kernels in rows_gemm.cuh and
// tile_gemm.cuh).
#include "launch.cuh"
#include "rows_gemm.cuh"
#include "tile_gemm.cuh"

using namespace mamba;

namespace {

// Checks for the tensor-core products: 1..64 contiguous rows of bf16/fp16 x, weight (n, k)
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

}  // namespace

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for 1..64 rows of 16-bit x on sm_90+ (tensor
// cores, clusters; see rows_gemm.cuh). Needs k % 8 == 0 and 16-byte aligned, contiguous x and weight.
// splits: blocks per cluster, each over a slice of k (0: the kernel's choice; the microbenchmark tries others);
// cols: output columns per cluster, 64 (a warp per 16 columns) or 16 (a warp per 16 rows: narrow weights).
at::Tensor rows_gemm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t splits, int64_t cols) {
    const int64_t k = x.size(-1), m = check_rows(x, weight, "rows_gemm"), n = weight.size(0);
    const auto type = x.scalar_type();
    TORCH_CHECK(cols == 16 || cols == 64, "rows_gemm: cols 16 or 64");
    const c10::cuda::CUDAGuard guard(x.device());
    const auto* props = at::cuda::getCurrentDeviceProperties();
    const GemmSplit split = gemm_split(static_cast<int>(k), static_cast<int>(splits));
    const int mt = static_cast<int>((m + 15) / 16);
    const size_t smem = gemm_smem(mt, static_cast<int>(cols), split, x.element_size());
    TORCH_CHECK(props->major >= 9 && smem <= props->sharedMemPerBlockOptin, "rows_gemm needs sm_90+ and k <= ~6000 (", smem, " bytes of shared memory)");
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    auto y = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(type).contiguous() : at::Tensor();
    const dim3 grid(split.splits, static_cast<unsigned>((n + cols - 1) / cols));
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(type, [&](auto zero) {
        using T = decltype(zero);
        if constexpr (!std::is_same_v<T, float>) {
            auto launch = [&](auto tiles) {
                auto kernel = cols == 16 ? rows_gemm_kernel<T, decltype(tiles)::value, 16> : rows_gemm_kernel<T, decltype(tiles)::value, 64>;
                C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));  // above 48 KB
                launch_with(kernel, grid, kGemmThreads, smem, stream, true, split.splits, static_cast<const T*>(x.data_ptr()),
                            static_cast<const T*>(weight.data_ptr()), bias.has_value() ? static_cast<const T*>(bc.data_ptr()) : nullptr,
                            static_cast<T*>(y.data_ptr()), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), split.slice);
            };
            switch (mt) {
                case 1: launch(std::integral_constant<int, 1>()); break;
                case 2: launch(std::integral_constant<int, 2>()); break;
                case 3: launch(std::integral_constant<int, 3>()); break;
                default: launch(std::integral_constant<int, 4>()); break;
            }
        }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

namespace {

// Launches tile_gemm_kernel<T, K> over y's (64, 64) tiles; splits as tile_gemm's.
template <typename T, int K>
void launch_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, T* y, int64_t m, int64_t n, int64_t splits, ConvArgs conv) {
    const int64_t k = x.size(-1), tiles = (n + kTileCols - 1) / kTileCols;
    const auto* props = at::cuda::getCurrentDeviceProperties();
    if (splits <= 0) splits = props->multiProcessorCount / tiles;
    splits = std::max<int64_t>(splits, (k + kTileMaxSlice - 1) / kTileMaxSlice);  // slices that fit shared memory
    const GemmSplit split = gemm_split(static_cast<int>(k), static_cast<int>(splits));
    const size_t smem = tile_smem_bytes(split);
    TORCH_CHECK(props->major >= 9 && smem <= props->sharedMemPerBlockOptin, "tile_gemm needs sm_90+ and ", smem,
                " bytes of shared memory (k = ", k, " in ", split.splits, " slices)");
    auto kernel = tile_gemm_kernel<T, K>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    static const bool plain = getenv("MAMBA_TILE_PLAIN") != nullptr;  // EXPERIMENT ONLY
    launch_with(kernel, dim3(split.splits, static_cast<unsigned>(tiles)), kTileThreads, smem, at::cuda::getCurrentCUDAStream(), !plain,
                plain && split.splits == 1 ? 0u : static_cast<unsigned>(split.splits), static_cast<const T*>(x.data_ptr()), static_cast<const T*>(weight.data_ptr()),
                bias.defined() ? static_cast<const T*>(bias.data_ptr()) : nullptr, y, static_cast<int>(m), static_cast<int>(n),
                static_cast<int>(k), split.slice, conv);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for 1..64 rows of 16-bit x on sm_90+, in (64, 64)
// tiles of y (tile_gemm.cuh); splits: blocks per cluster over slices of k (0: enough to give the
// SMs about one block each; at least enough for slices of kTileMaxSlice; at most 8).
at::Tensor tile_gemm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t splits) {
    const int64_t m = check_rows(x, weight, "tile_gemm"), n = weight.size(0);
    const c10::cuda::CUDAGuard guard(x.device());
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    auto y = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        if constexpr (!std::is_same_v<T, float>) launch_tiles<T, 0>(x, weight, bc, static_cast<T*>(y.data_ptr()), m, n, splits, ConvArgs{});
    });
    return y;
}

// One decoded token's in_proj and conv step for 1..64 rows in one kernel (the conv in tile_gemm's
// epilogue): x_c, z = x (..., k) @ weight (2d, k)^T (+ bias); returns (silu(conv step of x_c), z), each
// (..., d), with conv_state (rows, d, K) (contiguous, x's dtype; K 2..4) updated in place. d % 64 == 0.
std::vector<at::Tensor> tile_gemm_conv(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor conv_weight,
                                       c10::optional<at::Tensor> conv_bias, at::Tensor conv_state, int64_t splits) {
    const int64_t m = check_rows(x, weight, "tile_gemm_conv"), dim = weight.size(0) / 2, kernel = conv_weight.size(-1);
    TORCH_CHECK(dim % kTileCols == 0 && weight.size(0) == 2 * dim && kernel >= 2 && kernel <= 4 && conv_weight.numel() == dim * kernel &&
                conv_state.scalar_type() == x.scalar_type() && conv_state.is_contiguous() && conv_state.numel() == m * dim * kernel,
                "tile_gemm_conv: weight (2d, k) with d a multiple of 64, conv kernel 2..4, conv_state (rows, d, kernel) contiguous in x's dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    auto sizes = x.sizes().vec();
    sizes.back() = dim;
    auto u = at::empty(sizes, x.options()), z = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
    auto w = conv_weight.to(x.scalar_type()).contiguous();
    at::Tensor cb = conv_bias.has_value() ? conv_bias->to(x.scalar_type()).contiguous() : at::Tensor();
    ConvArgs conv{nullptr, w.data_ptr(), conv_bias.has_value() ? cb.data_ptr() : nullptr, conv_state.data_ptr(), u.data_ptr(), 0, 0, 1,
                  static_cast<int>(dim), static_cast<int>(kernel)};
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        if constexpr (!std::is_same_v<T, float>) {
            T* out = static_cast<T*>(z.data_ptr());
            switch (kernel) {
                case 2: launch_tiles<T, 2>(x, weight, bc, out, m, 2 * dim, splits, conv); break;
                case 3: launch_tiles<T, 3>(x, weight, bc, out, m, 2 * dim, splits, conv); break;
                default: launch_tiles<T, 4>(x, weight, bc, out, m, 2 * dim, splits, conv); break;
            }
        }
    });
    return {u, z};
}
