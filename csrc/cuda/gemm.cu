// Products of 1..64 rows on tensor cores for the extension (ops.h; kernel in rows_gemm.cuh).
#include "launch.cuh"
#include "rows_gemm.cuh"

using namespace mamba;

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for 1..64 rows of 16-bit x on sm_90+ (tensor
// cores, clusters; see rows_gemm.cuh). Needs k % 8 == 0 and 16-byte aligned, contiguous x and weight.
// splits: blocks per cluster, each over a slice of k (0: the kernel's choice; the microbenchmark tries others);
// cols: output columns per cluster, 64 (a warp per 16 columns) or 16 (a warp per 16 rows: narrow weights).
at::Tensor rows_gemm(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, int64_t splits, int64_t cols) {
    const int64_t k = x.size(-1), m = x.numel() / k, n = weight.size(0);
    const auto type = x.scalar_type();
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (type == at::kBFloat16 || type == at::kHalf) && weight.scalar_type() == type &&
                weight.is_contiguous() && weight.size(1) == k && k % 8 == 0 && m >= 1 && m <= 64 && (cols == 16 || cols == 64) &&
                aligned(x.data_ptr(), 16) && aligned(weight.data_ptr(), 16),
                "rows_gemm: 1..64 contiguous rows of bf16/fp16 x, weight (n, k) contiguous in x's dtype, k a multiple of 8, 16-byte aligned, cols 16 or 64");
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
