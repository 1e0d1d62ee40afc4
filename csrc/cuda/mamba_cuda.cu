// CUDA kernels for Mamba: selective scan (prefill and one-token decode) and causal conv, with
// carried state, so chunked prefill and exact continuation work (mamba_ssm's kernel has no
// initial state).
//
// Dimension glossary: b batch, l length, d inner channels, n state size, k conv kernel, r dt rank.
// Layouts are channels-last as the projections produce them: u, delta, z (b, l, d); B, C (b, l, n)
// with any strides on b and l and unit stride on the last dimension; states are contiguous
// (b, d, n) float32 and (b, d, k) in the model dtype.
//
// Scan: kSplit adjacent lanes share a channel, each holding n / kSplit of its states in registers,
// and walk the whole sequence once; every kSplit steps they reduce-scatter their partial outputs
// with shuffles. Each chunk of kChunk steps of u, dt, z, B and C is staged in shared memory by the
// whole block (B and C loaded once per block of channels) from loads issued during the previous
// chunk. All arithmetic is float32; the decays use an exact polynomial exp2 for float32 inputs and
// the hardware's ex2 for bf16/fp16 inputs (see mamba_kernels.cuh).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../norm_tensors.h"
#include "decode_step.cuh"
#include "fused_kernels.cuh"
#include "mamba_kernels.cuh"
#include "rows_gemm.cuh"

namespace {

using namespace mamba;

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

// The scan kernel with the fewest states per thread P (a power of two) that holds per_thread.
template <typename T, int P>
void launch_scan(int per_thread, dim3 grid, cudaStream_t stream, const ScanArgs& a) {
    if constexpr (P * kSplit >= 64) {
        scan_kernel<T, P><<<grid, kThreads, 0, stream>>>(a);  // n <= 64 is checked by the caller
    } else {
        if (per_thread <= P) scan_kernel<T, P><<<grid, kThreads, 0, stream>>>(a);
        else launch_scan<T, P * 2>(per_thread, grid, stream, a);
    }
}

// Launches a decode kernel with programmatic dependent launch where the GPU has it (sm_90+): its
// blocks may be scheduled while the previous kernel runs, and wait inside (wait_for_previous in
// fused_kernels.cuh), so a decoded token's ~120 small kernels overlap their launch and weight
// loads with their predecessors. Captured into CUDA graphs as programmatic edges.
constexpr int64_t kEarlyRows = 256;  // add + norm launches early for at most this many rows (decoding)

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

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_last(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.dim() == 3 && t.stride(2) == 1, name, " must be a CUDA (b, l, c) tensor with unit stride on c");
}

}  // namespace

// y = scan of u (b, l, d); delta before bias and softplus; state (b, d, n) float32 read and
// overwritten with the final state.
torch::Tensor selective_scan(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                             c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                             torch::Tensor state) {
    check_last(u, "u"); check_last(delta, "delta"); check_last(B, "B"); check_last(C, "C");
    TORCH_CHECK(delta.scalar_type() == u.scalar_type() && B.scalar_type() == u.scalar_type() && C.scalar_type() == u.scalar_type(),
                "u, delta, B and C must share a dtype");
    TORCH_CHECK(state.scalar_type() == torch::kFloat && state.is_contiguous() && A.scalar_type() == torch::kFloat && A.is_contiguous(),
                "A and state must be contiguous float32");
    const c10::cuda::CUDAGuard guard(u.device());
    const int batch = u.size(0), length = u.size(1), dim = u.size(2), nstate = A.size(1);
    TORCH_CHECK(nstate <= 64, "state size above 64 is not supported by the CUDA scan");
    auto y = torch::empty({batch, length, dim}, u.options());
    torch::Tensor Df = D.has_value() ? D->to(torch::kFloat).contiguous() : torch::Tensor();
    torch::Tensor bf = delta_bias.has_value() ? delta_bias->to(u.scalar_type()).contiguous() : torch::Tensor();  // no copy when already so
    if (z.has_value()) { check_last(*z, "z"); TORCH_CHECK(z->scalar_type() == u.scalar_type(), "z must have u's dtype"); }
    ScanArgs a{u.data_ptr(), delta.data_ptr(), B.data_ptr(), C.data_ptr(), z.has_value() ? z->data_ptr() : nullptr,
               A.data_ptr<float>(), D.has_value() ? Df.data_ptr<float>() : nullptr, delta_bias.has_value() ? bf.data_ptr() : nullptr,
               state.data_ptr<float>(), y.data_ptr(),
               u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
               z.has_value() ? z->stride(0) : 0, z.has_value() ? z->stride(1) : 0, length, dim, nstate};
    const dim3 grid(batch, (dim + kChannels - 1) / kChannels);
    auto stream = at::cuda::getCurrentCUDAStream();
    const int per_thread = (nstate + kSplit - 1) / kSplit;
    dispatch(u.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        launch_scan<T, 1>(per_thread, grid, stream, a);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// silu(causal depthwise conv of x (b, l, d)) continuing from conv_state (b, d, k), which is
// overwritten with the last k inputs.
torch::Tensor causal_conv1d(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, torch::Tensor conv_state) {
    check_last(x, "x");
    TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type(), "conv_state must be contiguous, in x's dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    const int batch = x.size(0), length = x.size(1), dim = x.size(2), kernel = weight.size(1);
    TORCH_CHECK(kernel >= 2 && kernel <= 4, "the CUDA conv supports kernel sizes 2..4");
    auto w = weight.to(x.scalar_type()).contiguous();  // no copies when the model's dtype already (every decode step)
    torch::Tensor bf = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : torch::Tensor();
    auto y = torch::empty({batch, length, dim}, x.options());
    ConvArgs a{x.data_ptr(), w.data_ptr(), bias.has_value() ? bf.data_ptr() : nullptr, conv_state.data_ptr(), y.data_ptr(),
               x.stride(0), x.stride(1), length, dim, kernel};
    const int threads = 128;
    const dim3 grid(batch, (dim + threads - 1) / threads, (length + kConvSteps - 1) / kConvSteps), grid_state(batch, (dim + threads - 1) / threads);
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        if (length == 1) {  // decoding: output and state update in one kernel
            switch (kernel) {
                case 2: launch_early(conv_step_kernel<T, 2>, grid_state, threads, 0, stream, true, a); break;
                case 3: launch_early(conv_step_kernel<T, 3>, grid_state, threads, 0, stream, true, a); break;
                default: launch_early(conv_step_kernel<T, 4>, grid_state, threads, 0, stream, true, a); break;
            }
            return;
        }
        switch (kernel) {
            case 2: conv_kernel<T, 2><<<grid, threads, 0, stream>>>(a); conv_state_kernel<T, 2><<<grid_state, threads, 0, stream>>>(a); break;
            case 3: conv_kernel<T, 3><<<grid, threads, 0, stream>>>(a); conv_state_kernel<T, 3><<<grid_state, threads, 0, stream>>>(a); break;
            default: conv_kernel<T, 4><<<grid, threads, 0, stream>>>(a); conv_state_kernel<T, 4><<<grid_state, threads, 0, stream>>>(a); break;
        }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// (normed, s): s = residual + x (float32 when residual_fp32, else x's dtype; x alone when residual
// is None), normed = weight * rmsnorm(s), with transformers' roundings (see fused_kernels.cuh).
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight, double eps,
                                        bool residual_fp32, bool cast_input) {
    TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
    const c10::cuda::CUDAGuard guard(x.device());
    const NormTensors t = norm_tensors(x, residual, weight, residual_fp32);
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        auto launch = [&](auto rzero) {
            using R = decltype(rzero);
            // 4 elements held per thread where they hold the row (prompts' many rows of mamba-130m: 12
            // cost it ~7% of pp2048 at 67 registers instead of 32), 12 otherwise
            launch_early(t.h <= 4 * kNormThreads ? add_rms_norm_kernel<T, R, 4> : add_rms_norm_kernel<T, R, kNormHeld>, t.rows, kNormThreads, 0,
                stream, t.rows <= kEarlyRows,
                static_cast<const T*>(t.x.data_ptr()), t.residual.defined() ? static_cast<const R*>(t.residual.data_ptr()) : nullptr,
                static_cast<const T*>(t.weight.data_ptr()), static_cast<T*>(t.out.data_ptr()), static_cast<R*>(t.res_out.data_ptr()),
                static_cast<int>(t.h), static_cast<float>(eps), cast_input);
        };
        if (residual_fp32) launch(0.0f); else launch(zero);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {t.out, t.res_out};
}

// y (b, 1, d) of one decode step: dt = dt_low (b, 1, r) @ dt_weight (d, r)^T, then the scan step
// from `state` (b, d, n) float32, updated in place. n must be a power of two <= 32.
torch::Tensor decode_step(torch::Tensor u, torch::Tensor dt_low, torch::Tensor dt_weight, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                          c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z, c10::optional<torch::Tensor> delta_bias,
                          torch::Tensor state) {
    check_last(u, "u"); check_last(dt_low, "dt_low"); check_last(B, "B"); check_last(C, "C");
    TORCH_CHECK(u.size(1) == 1, "decode_step takes one token");
    const auto type = u.scalar_type();
    TORCH_CHECK(dt_low.scalar_type() == type && dt_weight.scalar_type() == type && B.scalar_type() == type && C.scalar_type() == type,
                "u, dt_low, dt_weight, B and C must share a dtype");
    TORCH_CHECK(dt_weight.dim() == 2 && dt_weight.stride(1) == 1, "dt_weight must be (d, r) with unit stride on r");
    TORCH_CHECK(state.scalar_type() == torch::kFloat && state.is_contiguous() && A.scalar_type() == torch::kFloat && A.is_contiguous(),
                "A and state must be contiguous float32");
    const c10::cuda::CUDAGuard guard(u.device());
    const int batch = u.size(0), dim = u.size(2), nstate = A.size(1);
    auto y = torch::empty({batch, 1, dim}, u.options());
    torch::Tensor Df = D.has_value() ? D->to(torch::kFloat).contiguous() : torch::Tensor();
    torch::Tensor bf = delta_bias.has_value() ? delta_bias->to(u.scalar_type()).contiguous() : torch::Tensor();  // no copy when already so
    if (z.has_value()) { check_last(*z, "z"); TORCH_CHECK(z->scalar_type() == type, "z must have u's dtype"); }
    StepArgs a{u.data_ptr(), dt_low.data_ptr(), dt_weight.data_ptr(), B.data_ptr(), C.data_ptr(), z.has_value() ? z->data_ptr() : nullptr,
               A.data_ptr<float>(), D.has_value() ? Df.data_ptr<float>() : nullptr, delta_bias.has_value() ? bf.data_ptr() : nullptr,
               state.data_ptr<float>(), y.data_ptr(),
               u.stride(0), dt_low.stride(0), B.stride(0), C.stride(0), z.has_value() ? z->stride(0) : 0, dt_weight.stride(0),
               dim, static_cast<int>(dt_low.size(2))};
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(type, [&](auto zero) {
        using T = decltype(zero);
        // 4 lanes per channel (fewer for tiny n). One lane per channel (a softplus per channel, not 4)
        // measured 2.4x slower at batch 64: its state reads are no longer coalesced.
        // 4 rows per thread for grids of more than kStepRowBlocks blocks of one row (an H200, bf16:
        // mamba-1.4b at batch 64 4.65 -> 3.61 ms per token, 2.8b at 32 5.13 -> 4.47; 1-2% slower in
        // grids of up to 4,096 blocks: 1.4b at 32, 130m at 64).
        auto launch = [&](auto n) {
            constexpr int N = decltype(n)::value, L = N < 4 ? N : 4, S = N / L;
            const int channel_blocks = (dim + 128 / L - 1) / (128 / L);
            const int64_t elem = sizeof(T);
            a.vec = aligned(state.data_ptr(), 16) && aligned(B.data_ptr(), S * elem) && aligned(C.data_ptr(), S * elem) &&
                    B.stride(0) % S == 0 && C.stride(0) % S == 0;
            const int per_lane = kDtPiece * L, rank = a.rank;
            const bool dt_vec = rank % per_lane == 0 && rank / per_lane <= kMaxDtPieces && a.w_s0 % kDtPiece == 0 &&
                                a.dl_sb % kDtPiece == 0 && aligned(dt_weight.data_ptr(), kDtPiece * elem) && aligned(dt_low.data_ptr(), kDtPiece * elem);
            a.dt_pieces = dt_vec ? rank / per_lane : 0;
            const dim3 one_row(batch, channel_blocks);
            if (static_cast<int64_t>(batch) * channel_blocks > kStepRowBlocks)
                launch_early(decode_step_kernel<T, N, L, 4, 0>, dim3((batch + 3) / 4, channel_blocks), 128, 0, stream, true, a, batch);
            else if (a.dt_pieces == 0)
                launch_early(decode_step_kernel<T, N, L, 1, 0>, one_row, 128, 0, stream, true, a, batch);
            else if (a.dt_pieces <= 4)
                launch_early(decode_step_kernel<T, N, L, 1, 4>, one_row, 128, 0, stream, true, a, batch);
            else
                launch_early(decode_step_kernel<T, N, L, 1, kMaxDtPieces>, one_row, 128, 0, stream, true, a, batch);
        };
        switch (nstate) {
            case 1: launch(std::integral_constant<int, 1>()); break;
            case 2: launch(std::integral_constant<int, 2>()); break;
            case 4: launch(std::integral_constant<int, 4>()); break;
            case 8: launch(std::integral_constant<int, 8>()); break;
            case 16: launch(std::integral_constant<int, 16>()); break;
            case 32: launch(std::integral_constant<int, 32>()); break;
            default: TORCH_CHECK(false, "decode_step supports state sizes 1, 2, 4, 8, 16 and 32");
        }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// Checks for the one-row kernels: a (k,) row and (n, k) weight of one dtype, 16-byte aligned.
void check_row(const torch::Tensor& x, const torch::Tensor& weight) {
    const int64_t k = x.size(-1), vec = 16 / x.element_size();
    TORCH_CHECK(x.is_cuda() && x.numel() == k && x.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.is_contiguous() &&
                weight.size(1) == k && k % vec == 0 && aligned(x.data_ptr(), 16) &&
                aligned(weight.data_ptr(), 16),
                "one-row kernels: x one contiguous row, weight (n, k) contiguous in x's dtype, k a multiple of ", vec, ", 16-byte aligned");
}

// Whether a one-row product of n rows of k elements holds its weight rows in registers before
// its wait (fused_kernels.cuh, kHeldPieces): whole rows, and a grid of at most one wave.
template <typename T>
bool held_rows(int64_t n, int64_t k) { return n <= kHeldRows && k <= held_elements<T>(); }

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for one row of x.
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
    check_row(x, weight);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = weight.size(0), k = weight.size(1);
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    auto y = torch::empty(sizes, x.options());
    torch::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : torch::Tensor();
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        auto kernel = held_rows<T>(n, k) ? gemv_kernel<T, kHeldPieces> : gemv_kernel<T, 0>;
        launch_early(kernel, (n * 32 + 255) / 256, 256, 0, stream, true, static_cast<const T*>(x.data_ptr()), static_cast<const T*>(weight.data_ptr()),
                     bias.has_value() ? static_cast<const T*>(bc.data_ptr()) : nullptr, static_cast<T*>(y.data_ptr()), static_cast<int>(n),
                     static_cast<int>(k));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for 1..64 rows of 16-bit x on sm_90+ (tensor
// cores, clusters; see rows_gemm.cuh). Needs k % 8 == 0 and 16-byte aligned, contiguous x and weight.
// splits: blocks per cluster, each over a slice of k (0: the kernel's choice; the microbenchmark tries others);
// cols: output columns per cluster, 64 (a warp per 16 columns) or 16 (a warp per 16 rows: narrow weights).
torch::Tensor rows_gemm(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, int64_t splits, int64_t cols) {
    const int64_t k = x.size(-1), m = x.numel() / k, n = weight.size(0);
    const auto type = x.scalar_type();
    TORCH_CHECK(x.is_cuda() && x.is_contiguous() && (type == torch::kBFloat16 || type == torch::kHalf) && weight.scalar_type() == type &&
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
    auto y = torch::empty(sizes, x.options());
    torch::Tensor bc = bias.has_value() ? bias->to(type).contiguous() : torch::Tensor();
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

// One decoded token's add + RMSNorm, in_proj and conv step: s = residual + x (as add_rms_norm),
// then x, z = (norm(s) @ weight (2d, h)^T + bias) split in halves; returns (silu(conv step of x), z,
// s). x (1, 1, h); conv_state (1, d, k) updated in place.
std::vector<torch::Tensor> norm_in_proj_conv_step(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor norm_weight, double eps,
                                                  bool residual_fp32, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                                                  torch::Tensor conv_weight, c10::optional<torch::Tensor> conv_bias, torch::Tensor conv_state) {
    check_row(x, weight);
    const int64_t dim = weight.size(0) / 2, kernel = conv_weight.size(1), h = x.size(-1);
    TORCH_CHECK(kernel >= 2 && kernel <= 4 && conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type() &&
                conv_state.numel() == dim * kernel, "norm_in_proj_conv_step: kernel 2..4, conv_state (1, d, k) contiguous in the model dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    const NormTensors t = norm_tensors(x, residual, norm_weight, residual_fp32, /*with_out=*/false);
    auto xc = torch::empty({1, 1, dim}, x.options());
    auto z = torch::empty({1, 1, dim}, x.options());
    auto w = conv_weight.to(x.scalar_type()).contiguous();
    torch::Tensor cb = conv_bias.has_value() ? conv_bias->to(x.scalar_type()).contiguous() : torch::Tensor();
    torch::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : torch::Tensor();
    ConvArgs conv{nullptr, w.data_ptr(), conv_bias.has_value() ? cb.data_ptr() : nullptr, conv_state.data_ptr(), xc.data_ptr(), 0, 0, 1,
                  static_cast<int>(dim), static_cast<int>(kernel)};
    auto stream = at::cuda::getCurrentCUDAStream();
    const int blocks = static_cast<int>((2 * dim * 32 + kNormThreads - 1) / kNormThreads);
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        const size_t smem = h * sizeof(T);  // the block's copy of the normed row
        auto launch = [&](auto rzero, auto k) {
            using R = decltype(rzero);
            constexpr int K = decltype(k)::value;
            auto kernel = held_rows<T>(2 * dim, h) ? norm_in_proj_conv_kernel<T, R, K, kHeldPieces> : norm_in_proj_conv_kernel<T, R, K, 0>;
            launch_early(kernel, blocks, kNormThreads, smem, stream, true, static_cast<const T*>(t.x.data_ptr()),
                         t.residual.defined() ? static_cast<const R*>(t.residual.data_ptr()) : nullptr, static_cast<const T*>(t.weight.data_ptr()),
                         static_cast<R*>(t.res_out.data_ptr()), static_cast<float>(eps), static_cast<const T*>(weight.data_ptr()),
                         bias.has_value() ? static_cast<const T*>(bc.data_ptr()) : nullptr, conv, static_cast<T*>(z.data_ptr()), static_cast<int>(h));
        };
        auto by_kernel = [&](auto rzero) {
            switch (kernel) {
                case 2: launch(rzero, std::integral_constant<int, 2>()); break;
                case 3: launch(rzero, std::integral_constant<int, 3>()); break;
                default: launch(rzero, std::integral_constant<int, 4>()); break;
            }
        };
        if (residual_fp32) by_kernel(0.0f); else by_kernel(zero);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {xc, z, t.res_out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("gemv", &gemv, "x @ W^T for one row of x (CUDA)");
    m.def("rows_gemm", &rows_gemm, "x @ W^T for 1..64 rows of 16-bit x, tensor cores (CUDA, sm_90+)", py::arg("x"), py::arg("weight"),
          py::arg("bias"), py::arg("splits") = 0, py::arg("cols") = 64);
    m.def("norm_in_proj_conv_step", &norm_in_proj_conv_step, "add + RMSNorm, in_proj and conv step of one decoded token (CUDA)");
    m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm (CUDA)");
    m.def("decode_step", &decode_step, "dt_proj + one selective-scan step (CUDA)");
    m.def("selective_scan", &selective_scan, "selective scan with carried state (CUDA)");
    m.def("causal_conv1d", &causal_conv1d, "causal depthwise conv + SiLU with carried state (CUDA)");
}
