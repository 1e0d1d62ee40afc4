// Fused kernels that cut the number of launches per layer, mostly for decoding (no torch here).
//
// A decoded token used to cost ~18 kernels per layer (RMSNorm alone was 7 torch ops); with these,
// a layer is: add + RMSNorm + in_proj + conv step (1), x_proj (1), dt_proj + scan step (1),
// out_proj (1), each launched early (programmatic dependent launch) on sm_90+.
#pragma once
#include "mamba_kernels.cuh"

namespace mamba {

constexpr int kNormThreads = 256;

// Programmatic dependent launch (sm_90+): a decode kernel launched with it (see launch_early in
// mamba_cuda.cu) may start while the previous kernel in the stream still runs. It first lets the
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
// Prefetches bytes [0, n) at p into L2, the lanes of a warp taking 128-byte lines in turn.
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t n) {
    for (int64_t off = (threadIdx.x % 32) * 128; off < n; off += 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + off));
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
                                                                    int h, float eps, bool cast_input) {
    start_next_early();
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
    wait_for_previous();
    if (blockIdx.y * blockDim.x + threadIdx.x >= a.dim) return;
    const T* x = static_cast<const T*>(a.x) + b * a.x_sb;
    T* st = static_cast<T*>(a.state) + ((int64_t)b * a.dim + c) * K;
    chan.load_state(st);
    static_cast<T*>(a.y)[(int64_t)b * a.dim + c] = from_f<T>(chan.step(st, to_f(x[c])));
}

struct StepArgs {
    const void *u, *dt_low, *dt_weight, *B, *C, *z;
    const float *A, *D;
    const void* delta_bias;  // (d,) in the inputs' dtype
    float* state;
    void* y;
    int64_t u_sb, dl_sb, b_sb, c_sb, z_sb, w_s0;
    int dim, rank;
    int dt_pieces;  // kDtPiece-element pieces of dt's dot product per lane (<= the kernel's P), or 0
    bool vec;       // the state 16-byte aligned, B's and C's rows aligned to a lane's states: vector loads
};

// dt's dot product over the rank in pieces of kDtPiece consecutive elements (8 bytes of a 16-bit
// type, 16 of float32): at one batch row per thread, a lane takes rank / (kDtPiece * L) consecutive
// pieces (at most the kernel's P: 4, or kMaxDtPieces for ranks up to 160 at 4 lanes, every published size) of
// dt_weight[c], loaded before the wait for the previous kernel, and of its row of dt_low, so that all
// of its loads are in flight at once: one round trip to L2 instead of two (rank 48) to five (160).
constexpr int kDtPiece = 4;
constexpr int kMaxDtPieces = 10;
template <typename T>
using DtPiece = typename std::conditional<sizeof(T) == 4, uint4, uint2>::type;
template <typename T>
__device__ __forceinline__ float dot_dt_piece(const DtPiece<T>& a, const DtPiece<T>& b, float acc) {
    const T* ap = reinterpret_cast<const T*>(&a);
    const T* bp = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int j = 0; j < kDtPiece; j++) acc += to_f(ap[j]) * to_f(bp[j]);
    return acc;
}

// S consecutive values at p as one 8- or 16-byte load or store where they fill one and `aligned`
// says p is aligned to it (the state's 4 floats of a lane; B's and C's 4 bf16 values), else one by one.
template <int S, typename T>
__device__ __forceinline__ void load_vec(const T* p, bool aligned, float (&v)[S]) {
    constexpr int kBytes = S * static_cast<int>(sizeof(T));
    if constexpr (kBytes == 8 || kBytes == 16) {
        if (aligned) {
            using V = typename std::conditional<kBytes == 8, uint2, uint4>::type;
            const V q = *reinterpret_cast<const V*>(p);
            const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
            for (int i = 0; i < S; i++) v[i] = to_f(e[i]);
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < S; i++) v[i] = to_f(p[i]);
}
template <int S>
__device__ __forceinline__ void store_vec(float* p, bool aligned, const float (&v)[S]) {
    if constexpr (S == 4) {
        if (aligned) {
            *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < S; i++) p[i] = v[i];
}

// One decode step of a layer's SSM after the conv: dt = dt_low . dt_weight[c] (rounded to T, as the
// unfused path's matmul output is), softplus(dt + bias), the state update, the output with the D
// skip and the SiLU gate. L lanes per channel (a power of two dividing 32), each holding N / L
// consecutive states of it, so state reads and writes are coalesced; dt's dot product and the
// output's sum over states are shared out over those lanes and combined with shuffles. A thread
// takes R batch rows of its channel (grid (ceil(batch / R), channel blocks)), so that each dt_weight
// element is read once for R rows and the R rows' loads are in flight together: R = 4 for grids of
// more than kStepRowBlocks blocks of one row (2-3 waves of blocks instead of 6 or more), 1 otherwise.
// The blocks per SM whose registers the compiler must leave room for with 4 rows: 5 for n <= 16 (96
// registers, no spills; a cap of 80 spilled), 3 for n = 32. One row: no bound (0): 46-50 registers
// (dt in up to 4 pieces or element by element), 72 (10 pieces).
constexpr int kStepRowBlocks = 4096;
constexpr int step_min_blocks(int n, int rows) { return rows > 1 ? (n > 16 ? 3 : 5) : 0; }
template <typename T, int N, int L, int R, int P>
__global__ void __launch_bounds__(128, step_min_blocks(N, R)) decode_step_kernel(StepArgs a, int batch) {
    static_assert(P == 0 || R == 1, "dt in pieces at one row per thread (R rows of pieces: too many registers)");
    constexpr int kPerBlock = 128 / L, S = N / L;
    const int lane = threadIdx.x % L, b0 = blockIdx.x * R;
    const int c_wanted = blockIdx.y * kPerBlock + threadIdx.x / L;
    const bool active = c_wanted < a.dim;
    const int c = min(c_wanted, a.dim - 1);  // idle groups compute a duplicate and write nothing (shuffles need every lane)
    start_next_early();
    // The weights (A, dt bias, D) while the previous kernel may still run; then every other
    // independent load, so their latencies overlap with each other and with dt's math.
    const float* Ac = a.A + (int64_t)c * N + lane * S;
    float Av[S];
#pragma unroll
    for (int i = 0; i < S; i++) Av[i] = Ac[i] * kLog2e;  // A * log2(e), as in the scan kernel
    const float bias = a.delta_bias ? to_f(static_cast<const T*>(a.delta_bias)[c]) : 0.0f;
    const float Dc = a.D ? a.D[c] : 0.0f;
    const T* w = static_cast<const T*>(a.dt_weight) + c * a.w_s0;
    const int pieces = a.dt_pieces;
    DtPiece<T> wp[P > 0 ? P : 1];
#pragma unroll
    for (int i = 0; i < P; i++)
        if (i < pieces) wp[i] = reinterpret_cast<const DtPiece<T>*>(w)[lane * pieces + i];
    wait_for_previous();
    int rows[R];  // batch rows, the last repeated past the batch's end (computed, not stored)
    float h[R][S], Bv[R][S], Cv[R][S], u[R], zv[R], acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int b = rows[r] = min(b0 + r, batch - 1);
        load_vec(a.state + ((int64_t)b * a.dim + c) * N + lane * S, a.vec, h[r]);
        load_vec(static_cast<const T*>(a.B) + b * a.b_sb + lane * S, a.vec, Bv[r]);
        load_vec(static_cast<const T*>(a.C) + b * a.c_sb + lane * S, a.vec, Cv[r]);
        u[r] = to_f(static_cast<const T*>(a.u)[b * a.u_sb + c]);
        zv[r] = a.z ? to_f(static_cast<const T*>(a.z)[b * a.z_sb + c]) : 0.0f;
        acc[r] = 0.0f;
    }
    const T* dl = static_cast<const T*>(a.dt_low);
    if constexpr (P > 0) {
        const DtPiece<T>* d = reinterpret_cast<const DtPiece<T>*>(dl + rows[0] * a.dl_sb) + lane * pieces;
#pragma unroll
        for (int i = 0; i < P; i++)
            if (i < pieces) {
                const DtPiece<T> dv = d[i];  // a copy: through a reference the compiler loads element by element
                acc[0] = dot_dt_piece<T>(dv, wp[i], acc[0]);
            }
    } else {
#pragma unroll (8 / R)
        for (int j = lane; j < a.rank; j += L) {  // unrolled: 8 loads of dt_low in flight, not R
            const float wj = to_f(w[j]);
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] += to_f(dl[rows[r] * a.dl_sb + j]) * wj;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int off = L / 2; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffff, acc[r], off, L);
        const float dt = softplus_for<T>(to_f(from_f<T>(acc[r])) + bias);  // the prefill scan's numerics
        const float du = dt * u[r];
        float p = 0.0f;
#pragma unroll
        for (int i = 0; i < S; i++) {
            h[r][i] = exp2_for<T>(dt * Av[i]) * h[r][i] + du * Bv[r][i];
            p += h[r][i] * Cv[r][i];
        }
        const bool stored = active && b0 + r < batch;
        if (stored) store_vec(a.state + ((int64_t)rows[r] * a.dim + c) * N + lane * S, a.vec, h[r]);
#pragma unroll
        for (int off = L / 2; off > 0; off /= 2) p += __shfl_xor_sync(0xffffffff, p, off, L);
        if (stored && lane == 0) {
            const float gate = a.z ? silu(zv[r]) : 1.0f;
            static_cast<T*>(a.y)[(int64_t)rows[r] * a.dim + c] = from_f<T>((p + Dc * u[r]) * gate);
        }
    }
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

template <typename T>
__device__ __forceinline__ float dot_piece(const uint4& a, const uint4& b, float acc) {
    const T* ap = reinterpret_cast<const T*>(&a);
    const T* bp = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int j = 0; j < 16 / static_cast<int>(sizeof(T)); j++) acc += to_f(ap[j]) * to_f(bp[j]);
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
