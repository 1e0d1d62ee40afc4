// Fused kernels that cut the number of launches per layer, mostly for decoding (no torch here).
//
// A decoded token used to cost ~18 kernels per layer (RMSNorm alone was 7 torch ops); with these,
// a layer is: add + RMSNorm + in_proj + conv step (1), x_proj (1), dt_proj + scan step (1,
// decode_step.cuh), out_proj (1), each launched early (programmatic dependent launch) on sm_90+.
// Also the one-row GEMV (the head) and greedy decoding's argmax.
#pragma once
#include <cooperative_groups.h>

#include "mamba_kernels.cuh"

namespace mamba {

constexpr int kNormThreads = 256;

// Programmatic dependent launch (sm_90+): a decode kernel launched with it (see launch_early in
// launch.cuh) may start while the previous kernel in the stream still runs. It first lets the
// next kernel start early too, may prefetch its weights (constant data only), and must wait for
// the previous grid to finish before touching any activation or state. Without the launch
// attribute, or before sm_90, both are no-ops.
__device__ __forceinline__ void start_next_early() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Prefetches the 128-byte line at p into L2: a hint that never changes what a later load reads (L2
// is where the SMs' memory meets), so a kernel may prefetch before its wait what the previous kernel
// is still writing, or, as the decode kernels do with their layer's state, what it does not write.
__device__ __forceinline__ void prefetch_line(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }
// Prefetches bytes [0, n) at p into L2, the lanes of a warp taking 128-byte lines in turn.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t n) {
    for (int64_t off = (threadIdx.x % 32) * 128; off < n; off += 32 * 128) prefetch_line(static_cast<const char*>(p) + off);
}

// Bytes [0, bytes) at p that a decode kernel pulls into L2 before its wait, for a later kernel of
// the chain: cuBLAS's products, which cannot start early, read their weights cold from DRAM
// otherwise. p 16-byte aligned, bytes a multiple of 16; empty (bytes 0): nothing.
struct Ahead {
    const void* p = nullptr;
    int64_t bytes = 0;
};
// Issues `a`'s bulk prefetches into L2 (TMA, sm_90+; one instruction per piece of kAheadPiece
// bytes), a piece per block of the grid in turn, from its thread 0: the first blocks issue them all.
constexpr int64_t kAheadPiece = 32 << 10;
__device__ __forceinline__ void prefetch_ahead(const Ahead& a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x != 0) return;
    const int64_t blocks = (int64_t)gridDim.x * gridDim.y;
    for (int64_t off = (blockIdx.x + (int64_t)blockIdx.y * gridDim.x) * kAheadPiece; off < a.bytes; off += blocks * kAheadPiece)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(a.p) + off),
                     "r"(static_cast<unsigned>(min(kAheadPiece, a.bytes - off))) : "memory");
#endif
}

// Sum over the block, returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[kNormThreads / 32];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffff, v, off);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kNormThreads / 32; w++) total += partial[w];
    return total;
}

// s = residual + x at element i, in R (float32 for an fp32 residual stream, else T); x alone for
// the first block (residual null).
template <typename T, typename R>
__device__ __forceinline__ R residual_sum(const T* x, const R* residual, int i) {
    return residual != nullptr ? from_f<R>(to_f(residual[i]) + to_f(x[i])) : from_f<R>(to_f(x[i]));
}

// One row by one block of kNormThreads: out = weight * T(s' * rsqrt(mean(s'^2) + eps)) with s' = s
// rounded to T when cast_input (a block's norm) or s itself (the final norm), every rounding where
// transformers' torch code has one; s is stored to res_out unless it is null. The row goes in rounds
// of HELD elements per thread (one round up to 3,072 at kNormHeld: every published size), each round's loads
// (s and the weight) issued together before any store: a store to res_out may alias x for the
// compiler, so a load after it waits for it, and one element at a time made every element a round
// trip to L2. The second pass reuses the held values of a one-round row and recomputes s otherwise.
constexpr int kNormHeld = 12;
template <int HELD, typename T, typename R>
__device__ __forceinline__ void block_add_rms_norm(const T* x, const R* residual, const T* weight, T* out, R* res_out, int h, float eps,
                                                   bool cast_input) {
    constexpr int kRound = HELD * kNormThreads;
    R s[HELD];
    T wv[HELD];
    auto load = [&](int base) {
#pragma unroll
        for (int j = 0; j < HELD; j++) {
            const int i = base + j * kNormThreads + threadIdx.x;
            if (i < h) {
                s[j] = residual_sum(x, residual, i);
                wv[j] = weight[i];
            }
        }
    };
    auto cast = [&](R v) { return cast_input ? to_f(from_f<T>(to_f(v))) : to_f(v); };
    float ss = 0.0f;
    for (int base = 0; base < h; base += kRound) {
        load(base);
#pragma unroll
        for (int j = 0; j < HELD; j++) {
            const int i = base + j * kNormThreads + threadIdx.x;
            if (i < h) {
                if (res_out != nullptr) res_out[i] = s[j];
                const float v = cast(s[j]);
                ss += v * v;
            }
        }
    }
    const float scale = 1.0f / sqrtf(block_sum(ss) / h + eps);
    for (int base = 0; base < h; base += kRound) {
        if (h > kRound) load(base);
#pragma unroll
        for (int j = 0; j < HELD; j++) {
            const int i = base + j * kNormThreads + threadIdx.x;
            if (i < h) out[i] = from_f<T>(to_f(wv[j]) * to_f(from_f<T>(cast(s[j]) * scale)));
        }
    }
}

// The residual add + RMSNorm of many rows, one per block (prompts, and the final norm).
template <typename T, typename R, int HELD>
__global__ void __launch_bounds__(kNormThreads) add_rms_norm_kernel(const T* x, const R* residual, const T* weight, T* out, R* res_out,
                                                                    int h, float eps, bool cast_input, Ahead ahead) {
    start_next_early();
    prefetch_ahead(ahead);
    wait_for_previous();
    const int64_t row = blockIdx.x;
    block_add_rms_norm<HELD>(x + row * h, residual != nullptr ? residual + row * h : nullptr, weight, out + row * h, res_out + row * h, h, eps, cast_input);
}

// One channel of a causal conv step, its loads in parts so that they can be issued early:
// `load_taps` the weights and bias (constants: loadable before the wait for the previous kernel),
// `load_state` the state's last K - 1 inputs (oldest first, at st); `step` shifts the new input in,
// stores the state and returns silu(bias + taps . window).
template <typename T, int K>
struct ConvChannel {
    float w[K], bias, win[K];
    __device__ __forceinline__ void load_taps(const ConvArgs& a, int c) {
#pragma unroll
        for (int j = 0; j < K; j++) w[j] = to_f(static_cast<const T*>(a.w)[(int64_t)c * K + j]);
        bias = a.bias ? to_f(static_cast<const T*>(a.bias)[c]) : 0.0f;
    }
    __device__ __forceinline__ void load_state(const T* st) {
#pragma unroll
        for (int j = 0; j + 1 < K; j++) win[j] = to_f(st[j + 1]);
    }
    __device__ __forceinline__ float step(T* st, float input) {
        win[K - 1] = input;
        float acc = bias;
#pragma unroll
        for (int j = 0; j < K; j++) acc += win[j] * w[j];
#pragma unroll
        for (int j = 0; j < K; j++) st[j] = from_f<T>(win[j]);
        return silu(acc);
    }
};

// One decode step of the causal conv for a batch: a thread per (batch, channel).
template <typename T, int K>
__global__ void conv_step_kernel(ConvArgs a) {
    const int b = blockIdx.x, c = min(blockIdx.y * blockDim.x + threadIdx.x, a.dim - 1);
    start_next_early();
    ConvChannel<T, K> chan;
    chan.load_taps(a, c);
    T* st = static_cast<T*>(a.state) + ((int64_t)b * a.dim + c) * K;
    prefetch_line(st);  // from DRAM while the previous kernel runs: no kernel since this layer's last step wrote it
    wait_for_previous();
    if (blockIdx.y * blockDim.x + threadIdx.x >= a.dim) return;
    const T* x = static_cast<const T*>(a.x) + b * a.x_sb;
    chan.load_state(st);
    static_cast<T*>(a.y)[(int64_t)b * a.dim + c] = from_f<T>(chan.step(st, to_f(x[c])));
}

// A warp's 16-byte pieces of a row of k elements: lane i takes pieces i, i + 32, ... Decoding's
// products with small grids hold each weight row in registers (H = kHeldPieces pieces per lane:
// bf16 rows up to 2,048 elements, float32 up to 1,024), loaded before the wait for the previous
// kernel, so that after it only x is loaded: one round trip to L2 on the chain's critical path
// instead of two. It costs registers (30 -> 56 for the GEMV), so grids of more than one wave of
// blocks, whose later blocks cannot load early anyway, take H = 0: the row is only prefetched
// into L2, and loaded with x after the wait.
constexpr int kHeldPieces = 8;
constexpr int kHeldRows = 4096;  // at most this many rows (a wave of 4 blocks of 8 warps per SM)
template <typename T, int H = kHeldPieces>
constexpr int held_elements() { return H * 32 * (16 / static_cast<int>(sizeof(T))); }  // of a row, by a warp

template <int H, typename T>
__device__ __forceinline__ void load_pieces(const T* p, int k, uint4* r) {  // r: H registers (unrolled indices)
    constexpr int V = 16 / sizeof(T);  // elements per piece
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < H; j++) {
        const int i = (lane + 32 * j) * V;
        r[j] = i < k ? *reinterpret_cast<const uint4*>(p + i) : make_uint4(0, 0, 0, 0);
    }
}

// Before the wait: the row's first H pieces per lane into registers, the rest into L2.
template <int H, typename T>
__device__ __forceinline__ void hold_row(const T* w, int k, uint4* held) {
    constexpr int kHeld = held_elements<T, H>();
    load_pieces<H>(w, k, held);
    if (k > kHeld) prefetch_l2(w + kHeld, (int64_t)(k - kHeld) * sizeof(T));
}

// acc + a . b over the elements of T that two register pieces (uint2, uint4) hold.
template <typename T, typename V>
__device__ __forceinline__ float dot_piece(const V& a, const V& b, float acc) {
    const T* ap = reinterpret_cast<const T*>(&a);
    const T* bp = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(V) / sizeof(T)); j++) acc += to_f(ap[j]) * to_f(bp[j]);
    return acc;
}

// x . w over k elements by one warp (float32 accumulation), the sum in every lane; `held` is
// hold_row(w, k). Needs k % (16 / sizeof(T)) == 0 and 16-byte aligned x and w (checked by the
// callers).
template <int H, typename T>
__device__ __forceinline__ float warp_dot(const T* x, const uint4* held, const T* w, int k) {
    constexpr int V = 16 / sizeof(T);
    uint4 xs[H > 0 ? H : 1];
    load_pieces<H>(x, k, xs);  // all in flight together
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < H; j++) acc = dot_piece<T>(xs[j], held[j], acc);
#pragma unroll 4
    for (int i = (threadIdx.x % 32 + 32 * H) * V; i < k; i += 32 * V) {  // what is not held: several loads in flight per lane
        const uint4 xv = *reinterpret_cast<const uint4*>(x + i);  // copies: a reference into global memory would
        const uint4 wv = *reinterpret_cast<const uint4*>(w + i);  // let the compiler load element by element
        acc = dot_piece<T>(xv, wv, acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffff, acc, off);
    return acc;
}

// y (n,) = w (n, k) @ x (k,) (+ bias), rounded once to T: one warp per output row. Decoding's
// matrix-vector products (cuBLAS picks GEMM tilings that read these small matrices slowly).
template <typename T, int H>
__global__ void __launch_bounds__(256) gemv_kernel(const T* x, const T* w, const T* bias, T* y, int n, int k) {
    const int row = min((blockIdx.x * blockDim.x + threadIdx.x) / 32, n - 1);  // surplus warps repeat the last row, unstored
    const T* w_row = w + (int64_t)row * k;
    start_next_early();
    uint4 held[H > 0 ? H : 1];
    hold_row<H>(w_row, k, held);  // while the previous kernel runs
    const float b = bias ? to_f(bias[row]) : 0.0f;
    wait_for_previous();
    const float acc = warp_dot<H>(x, held, w_row, k);
    if (threadIdx.x % 32 == 0 && (blockIdx.x * blockDim.x + threadIdx.x) / 32 < n) y[row] = from_f<T>(acc + b);
}

// Greedy decoding's argmax: out[r] = the first index of the largest of row r's n values (NaN counts
// as largest, as in torch.argmax). A row is a cluster of kArgmaxBlocks blocks (sm_90+, few rows) or
// one block, each thread taking one 16-byte piece per pass (`vec`: rows 16-byte aligned) or one
// element, so that a 50,280-logit row is one load per thread; the blocks' results meet in block 0's
// shared memory. torch's reduction took 15 us of a 250 us 130m step, one block per row 7 us.
constexpr int kArgmaxThreads = 1024;
constexpr int kArgmaxBlocks = 8;  // the portable cluster size

// (value, index) as one integer whose maximum is the argmax: the value's bits made monotonic
// (NaN above everything, -0 as +0) above the complement of the index (ties: the first index).
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
    unsigned bits = __float_as_uint(v == 0.0f ? 0.0f : v);
    bits = v != v ? 0xffffffffu : (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
    return (static_cast<unsigned long long>(bits) << 32) | (0xffffffffu - static_cast<unsigned>(i));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

// Grid (blocks per row, rows), clusters of (blocks per row, 1, 1) on sm_90+.
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads) argmax_kernel(const T* x, int64_t stride, int n, bool vec, int64_t* out, int64_t out_stride) {
    __shared__ unsigned long long warp_best[kArgmaxThreads / 32], block_best;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank()), blocks = static_cast<int>(cluster.num_blocks());
#else
    const int rank = 0, blocks = 1;
#endif
    start_next_early();
    wait_for_previous();
    const T* row = x + blockIdx.y * stride;
    const int first = rank * kArgmaxThreads + threadIdx.x, step = blocks * kArgmaxThreads;
    constexpr int V = 16 / sizeof(T);
    const int body = vec ? n / V * V : 0;  // in pieces; the rest (a vocabulary's last few ids) element by element
    unsigned long long best = 0;  // below every key
#pragma unroll 4  // one block per row: ~6 passes over a 50,280-logit row, 4 loads in flight
    for (int i = first * V; i < body; i += step * V) {
        const uint4 q = *reinterpret_cast<const uint4*>(row + i);
        const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
        for (int j = 0; j < V; j++) best = max(best, argmax_key(to_f(e[j]), i + j));
    }
#pragma unroll 4
    for (int i = body + first; i < n; i += step) best = max(best, argmax_key(to_f(row[i]), i));
    best = warp_max(best);
    if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = warp_max(warp_best[threadIdx.x]);
        if (threadIdx.x == 0) block_best = best;
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cluster.sync();  // every block's best is in its shared memory
    if (rank == 0 && threadIdx.x < 32) best = warp_max(threadIdx.x < blocks ? *cluster.map_shared_rank(&block_best, threadIdx.x) : 0ull);
    cluster.sync();  // block 0 has read them: the others may exit
#endif
    if (rank == 0 && threadIdx.x == 0) out[blockIdx.y * out_stride] = 0xffffffffu - static_cast<unsigned>(best & 0xffffffffu);
}

// A decoded token's add + RMSNorm, in_proj and conv step in one kernel: every block first computes
// the normed row itself into shared memory (k values; block 0 also stores the new residual s),
// then rows [0, d) of w give x, whose channel c goes straight through the causal conv step (the
// conv is channel-local: the warp that computed x_c updates conv state c and writes silu(conv));
// rows [d, 2d) give z. x_c is rounded to T before the conv, as the unfused path stores it.
template <typename T, typename R, int K, int H>
__global__ void __launch_bounds__(kNormThreads, 4) norm_in_proj_conv_kernel(const T* x, const R* residual, const T* norm_w, R* res_out, float eps,
                                                                         const T* w, const T* bias, ConvArgs conv, T* z, int k) {
    extern __shared__ __align__(16) unsigned char smem[];
    T* normed = reinterpret_cast<T*>(smem);  // (k,)
    const int warp_row = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int row = min(warp_row, 2 * conv.dim - 1);  // surplus warps repeat the last row
    const T* w_row = w + (int64_t)row * k;
    const bool conv_lane = warp_row < conv.dim && threadIdx.x % 32 == 0;  // runs channel row's conv step
    T* st = static_cast<T*>(conv.state) + (int64_t)row * K;
    ConvChannel<T, K> chan;
    start_next_early();
    uint4 held[H > 0 ? H : 1];
    hold_row<H>(w_row, k, held);  // while the previous kernel runs
    if (H > 0 && conv_lane) chan.load_taps(conv, row);  // one-wave grids: all blocks are resident, loading early
    wait_for_previous();
    if (H > 0 && conv_lane) chan.load_state(st);  // in flight during the norm
    // (4 elements held per thread, rows up to 1,024 in one round, with H weight pieces: 104 registers at 12)
    block_add_rms_norm<(H > 0 ? 4 : kNormHeld)>(x, residual, norm_w, normed, blockIdx.x == 0 ? res_out : nullptr, k, eps, true);
    __syncthreads();
    if (warp_row >= 2 * conv.dim) return;
    const float acc = warp_dot<H>(normed, held, w_row, k);
    if (threadIdx.x % 32 != 0) return;
    const T v = from_f<T>(acc + (bias ? to_f(bias[row]) : 0.0f));
    if (row >= conv.dim) {
        z[row - conv.dim] = v;
        return;
    }
    if constexpr (H == 0) {
        chan.load_taps(conv, row);
        chan.load_state(st);
    }
    static_cast<T*>(conv.y)[row] = from_f<T>(chan.step(st, to_f(v)));
}

}  // namespace mamba
