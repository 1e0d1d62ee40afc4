// Host-side helpers of the CUDA translation units (scan.cu, decode.cu, gemm.cu): dtype dispatch,
// launches (early, in clusters) and argument checks. ATen's light headers only (see ops.h).
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "mamba_kernels.cuh"
#include "ops.h"

namespace mamba {

// Call f with a zero of the CUDA type matching a torch dtype.
template <typename F>
void dispatch(at::ScalarType type, F f) {
    switch (type) {
        case at::ScalarType::Float: f(0.0f); break;
        case at::ScalarType::BFloat16: f(__nv_bfloat16()); break;
        case at::ScalarType::Half: f(__half()); break;
        default: TORCH_CHECK(false, "unsupported dtype ", type, " (float32, bfloat16 or float16)");
    }
}

// Call f with std::integral_constant<int, K> for a causal conv of K = kernel taps (2..4, checked by
// the callers): the kernels take K as a template parameter.
template <typename F>
void dispatch_taps(int64_t kernel, F f) {
    switch (kernel) {
        case 2: f(std::integral_constant<int, 2>()); break;
        case 3: f(std::integral_constant<int, 3>()); break;
        default: f(std::integral_constant<int, 4>()); break;
    }
}

// Launches a decode kernel with programmatic dependent launch where the GPU has it (sm_90+): its
// blocks may be scheduled while the previous kernel runs, and wait inside (wait_for_previous in
// fused_kernels.cuh), so a decoded token's ~120 small kernels overlap their launch and weight
// loads with their predecessors. Captured into CUDA graphs as programmatic edges.
// `early` false: an ordinary launch (prompt-sized grids, whose blocks would only hold SM slots
// while waiting). `cluster` > 0: thread-block clusters of (cluster, 1, 1) (sm_90+ only).
template <typename... Params, typename... Args>
void launch_with(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool early, unsigned cluster, Args... args) {
    static const bool supported = at::cuda::getCurrentDeviceProperties()->major >= 9;
    cudaLaunchAttribute attribute[2];
    unsigned count = 0;
    if (supported && early) {
        attribute[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attribute[count++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster > 0) {
        attribute[count].id = cudaLaunchAttributeClusterDimension;
        attribute[count++].val.clusterDim = {cluster, 1, 1};
    }
    cudaLaunchConfig_t config{grid, block, smem, stream, attribute, count};
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}
template <typename... Params, typename... Args>
void launch_early(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool early, Args... args) {
    launch_with(kernel, grid, block, smem, stream, early, 0, args...);
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline void check_last(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.dim() == 3 && t.stride(2) == 1, name, " must be a CUDA (b, l, c) tensor with unit stride on c");
}

}  // namespace mamba
