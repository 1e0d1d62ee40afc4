// The prompt's scan and conv (and the conv's one-token step) for the extension (ops.h).
#include "fused_kernels.cuh"
#include "launch.cuh"
#include "mamba_kernels.cuh"
#include "scan_kernel.cuh"

using namespace mamba;

namespace {

// The scan kernel with the fewest states per thread P (a power of two) that holds per_thread; its
// vector-load form where every tile row is whole 16-byte vectors (`vec`, checked by the caller) and
// the state size is exactly kSplit * P (no padded columns in the B and C tiles).
template <typename T, int P>
void launch_scan(int per_thread, bool vec, dim3 grid, cudaStream_t stream, const ScanArgs& a) {
    if (per_thread > P) {
        if constexpr (P * kSplit < 64) launch_scan<T, P * 2>(per_thread, vec, grid, stream, a);  // n <= 64: checked by the caller
        return;
    }
    if constexpr (kScanVec && (kSplit * P) % kVec<T> == 0 && (sizeof(T) < 4 || P <= 4)) {  // (float32 from 8 states a lane: spills)
        if (vec && a.nstate == kSplit * P) {
            scan_kernel<T, P, true><<<grid, kThreads, 0, stream>>>(a);
            return;
        }
    }
    scan_kernel<T, P, false><<<grid, kThreads, 0, stream>>>(a);
}

}  // namespace

// y = scan of u (b, l, d); delta before bias and softplus; state (b, d, n) float32 read and
// overwritten with the final state.
at::Tensor selective_scan(at::Tensor u, at::Tensor delta, at::Tensor A, at::Tensor B, at::Tensor C,
                             c10::optional<at::Tensor> D, c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias,
                             at::Tensor state) {
    check_last(u, "u"); check_last(delta, "delta"); check_last(B, "B"); check_last(C, "C");
    TORCH_CHECK(delta.scalar_type() == u.scalar_type() && B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type(),
                "u, delta, B and C must share a dtype");
    TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && A.scalar_type() == at::kFloat && A.is_contiguous(),
                "A and state must be contiguous float32");
    const c10::cuda::CUDAGuard guard(u.device());
    const int batch = u.size(0), length = u.size(1), dim = u.size(2), nstate = A.size(1);
    TORCH_CHECK(nstate <= 64, "state size above 64 is not supported by the CUDA scan");
    auto y = at::empty({batch, length, dim}, u.options());
    at::Tensor Df = D.has_value() ? D->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor bf = delta_bias.has_value() ? delta_bias->to(u.scalar_type()).contiguous() : at::Tensor();  // no copy when already so
    if (z.has_value()) { check_last(*z, "z"); TORCH_CHECK(z->scalar_type() == u.scalar_type(), "z must have u's dtype"); }
    ScanArgs a{u.data_ptr(), delta.data_ptr(), B.data_ptr(), C.data_ptr(), z.has_value() ? z->data_ptr() : nullptr,
               A.data_ptr<float>(), D.has_value() ? Df.data_ptr<float>() : nullptr, delta_bias.has_value() ? bf.data_ptr() : nullptr,
               state.data_ptr<float>(), y.data_ptr(),
               u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
               z.has_value() ? z->stride(0) : 0, z.has_value() ? z->stride(1) : 0, length, dim, nstate};
    const dim3 grid(batch, (dim + kChannels - 1) / kChannels);
    auto stream = at::cuda::getCurrentCUDAStream();
    const int per_thread = (nstate + kSplit - 1) / kSplit;
    const int64_t item = u.element_size();  // 16-byte vectors: every tile's rows and batch offsets aligned, whole vectors of channels
    bool vec = dim % (16 / item) == 0;
    for (const at::Tensor* t : {&u, &delta, &B, &C, z.has_value() ? &*z : &u})
        vec = vec && aligned(t->data_ptr(), 16) && t->stride(0) * item % 16 == 0 && t->stride(1) * item % 16 == 0;
    dispatch(u.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        launch_scan<T, 1>(per_thread, vec, grid, stream, a);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// silu(causal depthwise conv of x (b, l, d)) continuing from conv_state (b, d, k), which is
// overwritten with the last k inputs.
at::Tensor causal_conv1d(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias, at::Tensor conv_state) {
    check_last(x, "x");
    TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type(), "conv_state must be contiguous, in x's dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    const int batch = x.size(0), length = x.size(1), dim = x.size(2), kernel = weight.size(1);
    TORCH_CHECK(kernel >= 2 && kernel <= 4, "the CUDA conv supports kernel sizes 2..4");
    auto w = weight.to(x.scalar_type()).contiguous();  // no copies when the model's dtype already (every decode step)
    at::Tensor bf = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
    auto y = at::empty({batch, length, dim}, x.options());
    ConvArgs a{x.data_ptr(), w.data_ptr(), bias.has_value() ? bf.data_ptr() : nullptr, conv_state.data_ptr(), y.data_ptr(),
               x.stride(0), x.stride(1), length, dim, kernel};
    const int threads = 128;
    const dim3 grid(batch, (dim + threads - 1) / threads, (length + kConvSteps - 1) / kConvSteps), grid_state(batch, (dim + threads - 1) / threads);
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        dispatch_taps(kernel, [&](auto taps) {
            constexpr int K = decltype(taps)::value;
            if (length == 1) {  // decoding: output and state update in one kernel
                launch_early(conv_step_kernel<T, K>, grid_state, threads, 0, stream, true, a);
                return;
            }
            conv_kernel<T, K><<<grid, threads, 0, stream>>>(a);
            conv_state_kernel<T, K><<<grid_state, threads, 0, stream>>>(a);
        });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}
