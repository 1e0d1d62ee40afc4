// A decoded token's kernels for the extension (ops.h): add + RMSNorm, the decode step, the one-row
// GEMV, the fused add + RMSNorm + in_proj + conv step, and greedy decoding's argmax.
#include "../norm_tensors.h"
#include "decode_step.cuh"
#include "fused_kernels.cuh"
#include "launch.cuh"

using namespace mamba;

namespace {

constexpr int64_t kEarlyRows = 256;  // add + norm launches early for at most this many rows (decoding)

// Checks for the one-row kernels: a (k,) row and (n, k) weight of one dtype, 16-byte aligned.
void check_row(const at::Tensor& x, const at::Tensor& weight) {
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

// A tensor to pull into L2 ahead of its reader by a grid of `blocks` blocks (fused_kernels.cuh,
// Ahead): empty unless it is a contiguous CUDA tensor that the bulk prefetch takes (16-byte aligned, a
// multiple of 16 bytes long) and its pieces come to at most kAheadPerBlock per block. More holds the
// few SMs that issue them past the kernel's end: on an H200 the norm (a block per row) pulling the
// 790m in_proj's 18 MB made a decoded token 2-28% slower at batch 64-8 (288 KB-2.3 MB per block),
// while 128-256 KB per block (370m, batch 64 and 32) made it faster.
constexpr int64_t kAheadPerBlock = 256 << 10;
Ahead ahead_of(const c10::optional<at::Tensor>& t, int64_t blocks) {
    if (!t.has_value() || !t->is_cuda() || !t->is_contiguous() || !aligned(t->data_ptr(), 16) || t->nbytes() % 16 != 0 ||
        static_cast<int64_t>(t->nbytes()) > blocks * kAheadPerBlock)
        return {};
    return {t->data_ptr(), static_cast<int64_t>(t->nbytes())};
}

}  // namespace

// (normed, s): s = residual + x (float32 when residual_fp32, else x's dtype; x alone when residual
// is None), normed = weight * rmsnorm(s), with transformers' roundings (see fused_kernels.cuh).
// Decoding's launches (early) pull `ahead` into L2 meanwhile.
std::vector<at::Tensor> add_rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight, double eps,
                                        bool residual_fp32, bool cast_input, c10::optional<at::Tensor> ahead) {
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
                static_cast<int>(t.h), static_cast<float>(eps), cast_input, t.rows <= kEarlyRows ? ahead_of(ahead, t.rows) : Ahead{});
        };
        if (residual_fp32) launch(0.0f); else launch(zero);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {t.out, t.res_out};
}

// y (b, 1, d) of one decode step: dt = dt_low (b, 1, r) @ dt_weight (d, r)^T, then the scan step
// from `state` (b, d, n), float32 or u's dtype, updated in place. n must be a power of two <= 32.
// Pulls `ahead` into L2 meanwhile.
at::Tensor decode_step(at::Tensor u, at::Tensor dt_low, at::Tensor dt_weight, at::Tensor A, at::Tensor B, at::Tensor C,
                          c10::optional<at::Tensor> D, c10::optional<at::Tensor> z, c10::optional<at::Tensor> delta_bias,
                          at::Tensor state, c10::optional<at::Tensor> ahead) {
    check_last(u, "u"); check_last(dt_low, "dt_low"); check_last(B, "B"); check_last(C, "C");
    TORCH_CHECK(u.size(1) == 1, "decode_step takes one token");
    const auto type = u.scalar_type();
    TORCH_CHECK(dt_low.scalar_type() == type && dt_weight.scalar_type() == type && B.scalar_type() == type && C.scalar_type() == type,
                "u, dt_low, dt_weight, B and C must share a dtype");
    TORCH_CHECK(dt_weight.dim() == 2 && dt_weight.stride(1) == 1, "dt_weight must be (d, r) with unit stride on r");
    TORCH_CHECK((state.scalar_type() == at::kFloat || state.scalar_type() == type) && state.is_contiguous() && A.scalar_type() == at::kFloat &&
                A.is_contiguous(), "A must be contiguous float32, state contiguous float32 or u's dtype");
    const c10::cuda::CUDAGuard guard(u.device());
    const int batch = u.size(0), dim = u.size(2), nstate = A.size(1);
    auto y = at::empty({batch, 1, dim}, u.options());
    at::Tensor Df = D.has_value() ? D->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor bf = delta_bias.has_value() ? delta_bias->to(u.scalar_type()).contiguous() : at::Tensor();  // no copy when already so
    if (z.has_value()) { check_last(*z, "z"); TORCH_CHECK(z->scalar_type() == type, "z must have u's dtype"); }
    StepArgs a{u.data_ptr(), dt_low.data_ptr(), dt_weight.data_ptr(), B.data_ptr(), C.data_ptr(), z.has_value() ? z->data_ptr() : nullptr,
               A.data_ptr<float>(), D.has_value() ? Df.data_ptr<float>() : nullptr, delta_bias.has_value() ? bf.data_ptr() : nullptr,
               state.data_ptr(), y.data_ptr(),
               u.stride(0), dt_low.stride(0), B.stride(0), C.stride(0), z.has_value() ? z->stride(0) : 0, dt_weight.stride(0),
               dim, static_cast<int>(dt_low.size(2))};
    auto stream = at::cuda::getCurrentCUDAStream();
    auto by_types = [&](auto zero, auto state_zero) {
        using T = decltype(zero);
        using ST = decltype(state_zero);
        // 4 lanes per channel (fewer for tiny n). One lane per channel (a softplus per channel, not 4)
        // measured 2.4x slower at batch 64: its state reads are no longer coalesced.
        // 4 rows per thread for grids of more than kStepRowBlocks blocks of one row (an H200, bf16:
        // mamba-1.4b at batch 64 4.65 -> 3.61 ms per token, 2.8b at 32 5.13 -> 4.47; 1-2% slower in
        // grids of up to 4,096 blocks: 1.4b at 32, 130m at 64).
        auto launch = [&](auto n) {
            constexpr int N = decltype(n)::value, L = N < 4 ? N : 4, S = N / L;
            const int channel_blocks = (dim + 128 / L - 1) / (128 / L);
            const int64_t elem = sizeof(T);
            a.vec = aligned(state.data_ptr(), S * sizeof(ST)) && aligned(B.data_ptr(), S * elem) && aligned(C.data_ptr(), S * elem) &&
                    B.stride(0) % S == 0 && C.stride(0) % S == 0;
            const int per_lane = kDtPiece * L, rank = a.rank;
            const bool dt_vec = rank % per_lane == 0 && rank / per_lane <= kMaxDtPieces && a.w_s0 % kDtPiece == 0 &&
                                a.dl_sb % kDtPiece == 0 && aligned(dt_weight.data_ptr(), kDtPiece * elem) && aligned(dt_low.data_ptr(), kDtPiece * elem);
            a.dt_pieces = dt_vec ? rank / per_lane : 0;
            const dim3 one_row(batch, channel_blocks);
            const bool four_rows = static_cast<int64_t>(batch) * channel_blocks > kStepRowBlocks;
            a.ahead = ahead_of(ahead, static_cast<int64_t>(four_rows ? (batch + 3) / 4 : batch) * channel_blocks);
            if (four_rows)
                launch_early(decode_step_kernel<T, ST, N, L, 4, 0>, dim3((batch + 3) / 4, channel_blocks), 128, 0, stream, true, a, batch);
            else if (a.dt_pieces == 0)
                launch_early(decode_step_kernel<T, ST, N, L, 1, 0>, one_row, 128, 0, stream, true, a, batch);
            else if (a.dt_pieces <= 4)
                launch_early(decode_step_kernel<T, ST, N, L, 1, 4>, one_row, 128, 0, stream, true, a, batch);
            else
                launch_early(decode_step_kernel<T, ST, N, L, 1, kMaxDtPieces>, one_row, 128, 0, stream, true, a, batch);
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
    };
    dispatch(type, [&](auto zero) {
        if (state.scalar_type() == at::kFloat) by_types(zero, 0.0f);
        else by_types(zero, zero);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return y;
}

// y (..., n) = x (..., k) @ weight (n, k)^T (+ bias) for one row of x.
at::Tensor gemv(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
    check_row(x, weight);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = weight.size(0), k = weight.size(1);
    auto sizes = x.sizes().vec();
    sizes.back() = n;
    auto y = at::empty(sizes, x.options());
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
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

// One decoded token's add + RMSNorm, in_proj and conv step: s = residual + x (as add_rms_norm),
// then x, z = (norm(s) @ weight (2d, h)^T + bias) split in halves; returns (silu(conv step of x), z,
// s). x (1, 1, h); conv_state (1, d, k) updated in place.
std::vector<at::Tensor> norm_in_proj_conv_step(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor norm_weight, double eps,
                                                  bool residual_fp32, at::Tensor weight, c10::optional<at::Tensor> bias,
                                                  at::Tensor conv_weight, c10::optional<at::Tensor> conv_bias, at::Tensor conv_state) {
    check_row(x, weight);
    const int64_t dim = weight.size(0) / 2, kernel = conv_weight.size(1), h = x.size(-1);
    TORCH_CHECK(kernel >= 2 && kernel <= 4 && conv_state.is_contiguous() && conv_state.scalar_type() == x.scalar_type() &&
                conv_state.numel() == dim * kernel, "norm_in_proj_conv_step: kernel 2..4, conv_state (1, d, k) contiguous in the model dtype");
    const c10::cuda::CUDAGuard guard(x.device());
    const NormTensors t = norm_tensors(x, residual, norm_weight, residual_fp32, /*with_out=*/false);
    auto xc = at::empty({1, 1, dim}, x.options());
    auto z = at::empty({1, 1, dim}, x.options());
    auto w = conv_weight.to(x.scalar_type()).contiguous();
    at::Tensor cb = conv_bias.has_value() ? conv_bias->to(x.scalar_type()).contiguous() : at::Tensor();
    at::Tensor bc = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
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
        auto by_kernel = [&](auto rzero) { dispatch_taps(kernel, [&](auto taps) { launch(rzero, taps); }); };
        if (residual_fp32) by_kernel(0.0f); else by_kernel(zero);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {xc, z, t.res_out};
}

// out (b,) int64 = each row's argmax over x (b, n) (any row stride, unit stride on n), as torch.argmax.
void argmax(at::Tensor x, at::Tensor out) {
    TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.size(0) < 65536 && x.size(1) > 0 && x.size(1) < (1LL << 31),
                "argmax: x (b, n) on CUDA, unit stride on n, b < 65,536");
    TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kLong && out.dim() == 1 && out.size(0) == x.size(0), "argmax: out (b,) int64");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t vec = 16 / x.element_size();
    const bool aligned_rows = aligned(x.data_ptr(), 16) && x.stride(0) % vec == 0;
    // A cluster of blocks per row on sm_90+ for up to 8 rows, else a block per row (an H200, 130m: one
    // row 6.9 -> 3.3 us after the head's product, batch 8 unchanged, batch 64 in clusters of 4 6.8 -> 9.3).
    const bool clusters = at::cuda::getCurrentDeviceProperties()->major >= 9 && x.size(0) <= 8;
    const int64_t rows = x.size(0), per_row = clusters ? kArgmaxBlocks : 1;
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), [&](auto zero) {
        using T = decltype(zero);
        launch_with(argmax_kernel<T>, dim3(per_row, rows), kArgmaxThreads, 0, stream, true, clusters ? per_row : 0,
                    static_cast<const T*>(x.data_ptr()), x.stride(0), static_cast<int>(x.size(1)), aligned_rows, out.data_ptr<int64_t>(), out.stride(0));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}
