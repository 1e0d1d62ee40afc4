// CUDA kernels for Mamba (no torch here: scan.cu, decode.cu and gemm.cu launch them), see ops.h.
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mamba {

// The scan's compile-time shape; benchmarks/scan_variants.py builds other values to compare.
#ifndef MAMBA_SCAN_SPLIT
#define MAMBA_SCAN_SPLIT 4
#endif
#ifndef MAMBA_SCAN_THREADS
#define MAMBA_SCAN_THREADS 128
#endif
#ifndef MAMBA_SCAN_CHUNK
#define MAMBA_SCAN_CHUNK 32
#endif
#ifndef MAMBA_SCAN_BLOCKS
#define MAMBA_SCAN_BLOCKS 4
#endif
constexpr int kSplit = MAMBA_SCAN_SPLIT;  // adjacent lanes per channel, each holding n / kSplit of its states
constexpr int kThreads = MAMBA_SCAN_THREADS;  // threads per block
constexpr int kChannels = kThreads / kSplit;  // channels per block
constexpr int kChunk = MAMBA_SCAN_CHUNK;  // time steps staged in shared memory at once
constexpr int kMinBlocks = MAMBA_SCAN_BLOCKS;  // blocks per SM the registers must allow
static_assert((kSplit & (kSplit - 1)) == 0 && kSplit <= 32 && kChunk % kSplit == 0, "kSplit: a power of two dividing kChunk");
constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// softplus in double: an error in dt is multiplied by |dt * A| (up to ~30) in the decay exp(dt * A),
// so for float32 inputs dt must be correctly rounded; this runs once per (step, channel).
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : static_cast<float>(log1p(exp(static_cast<double>(x)))); }
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
// For bf16/fp16 inputs (3-4 significant digits): hardware exp/log, relative error <= 1e-4.
// 2^x and log2(x) by the hardware's ex2/lg2 (MUFU, ~2 ulp), flushing denormals (the non-ftz forms
// that __expf/__logf compile to add a range test and two multiplies around each).
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float log2_fast(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// For bf16/fp16 inputs (3-4 significant digits): hardware exp/log, relative error <= 1e-4. Both
// branch-free (they run once per staged element of every scan chunk), with the approximate
// reciprocal (__frcp_rn's IEEE rounding has a slow path behind a branch).
__device__ __forceinline__ float softplus_fast(float x) {
    const float e = exp2_fast(fminf(x, 20.0f) * kLog2e);
    const float series = e * (1.0f - e * (0.5f - e * (1.0f / 3.0f)));  // log1p(e) for e < 0.0067
    const float body = x < -5.0f ? series : log2_fast(1.0f + e) * (1.0f / kLog2e);
    return x > 20.0f ? x : body;
}
__device__ __forceinline__ float silu_fast(float x) { return __fdividef(x, 1.0f + exp2_fast(-x * kLog2e)); }

// 2^x for x <= 0, all FMAs and integer ops (no conversion-pipe instructions, which run at a quarter
// of the FMA rate): rounding by the 1.5 * 2^23 shift, then 2^f for |f| <= 1/2 by its degree-7 Taylor
// polynomial (truncation 5e-9, so about 1 ulp and unbiased, unlike the hardware ex2, whose small
// bias compounds along a long product of decays in float32).
__device__ __forceinline__ float exp2_poly(float x) {
    x = fmaxf(x, -125.0f);
    const float shifted = x + 12582912.0f;  // round(x) in the low mantissa bits
    const float f = x - (shifted - 12582912.0f);
    float p = 1.5252733804059841e-5f;  // ln2^7 / 7!
    p = fmaf(p, f, 1.5403530393381609e-4f);
    p = fmaf(p, f, 1.3333558146428443e-3f);
    p = fmaf(p, f, 9.6181291076284772e-3f);
    p = fmaf(p, f, 5.5504108664821580e-2f);
    p = fmaf(p, f, 2.4022650695910071e-1f);
    p = fmaf(p, f, 6.9314718055994531e-1f);
    p = fmaf(p, f, 1.0f);
    return __int_as_float(__float_as_int(p) + ((__float_as_int(shifted) - 0x4B400000) << 23));
}

// The numerics by input type, shared by the prefill scan and the decode step so that both agree:
// float32 inputs take the exact functions, bf16/fp16 inputs the hardware ones. For the decays of
// bf16-rounded inputs, the hardware ex2 leaves a final-state error of 2.6e-6 against float64, and
// 1.4e-5 with decays within 1e-4 of 1 over 3,000 steps (3.2e-6 with exp2_poly): far below the
// inputs' rounding (3.9e-3), for a 1.2x faster scan.
template <typename T>
constexpr bool kHardwareMath = !std::is_same<T, float>::value;
template <typename T>
__device__ __forceinline__ float softplus_for(float x) { return kHardwareMath<T> ? softplus_fast(x) : softplus(x); }
template <typename T>
__device__ __forceinline__ float exp2_for(float x) { return kHardwareMath<T> ? exp2_fast(x) : exp2_poly(x); }
template <typename T>
__device__ __forceinline__ float silu_for(float x) { return kHardwareMath<T> ? silu_fast(x) : silu(x); }

struct ScanArgs {
    const void *u, *delta, *B, *C, *z;
    const float *A, *D;
    const void* delta_bias;  // (d,) in the inputs' dtype, as the model stores it
    float* state;
    void* y;
    int64_t u_sb, u_sl, d_sb, d_sl, b_sb, b_sl, c_sb, c_sl, z_sb, z_sl;
    int length, dim, nstate;
};

// acc[s]: this lane's partial output (over its states) for step s of a group of S = kSplit steps.
// Returns the full sum over the kSplit lanes of step `part`: S - 1 shuffles for S steps (a
// reduce-scatter; each round halves the steps a lane keeps and doubles the lanes summed).
template <int S>
__device__ __forceinline__ float reduce_scatter(float (&acc)[S], int part) {
#pragma unroll
    for (int w = 1; w < S; w *= 2) {
        const bool upper = part & w;
#pragma unroll
        for (int j = 0; j < S / (2 * w); j++) {
            const float keep = upper ? acc[2 * j + 1] : acc[2 * j];
            const float send = upper ? acc[2 * j] : acc[2 * j + 1];
            acc[j] = keep + __shfl_xor_sync(0xffffffffu, send, w);
        }
    }
    return acc[0];
}

template <int N>
__device__ __forceinline__ void load_row(const float* p, float (&v)[N]) {  // p 16-byte aligned when N % 4 == 0
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N; i += 4) {
            const float4 q = *reinterpret_cast<const float4*>(p + i);
            v[i] = q.x; v[i + 1] = q.y; v[i + 2] = q.z; v[i + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) v[i] = p[i];
    }
}

// Loads of a (kChunk, cols) tile per thread, cols a power of two <= kThreads: thread i holds column
// i % cols of rows i / cols + k * kThreads / cols (rows past kChunk, when the tile is small, unused).
constexpr int tile_loads(int cols) { return kChunk * cols >= kThreads ? kChunk * cols / kThreads : 1; }

// Loads this thread's part of the (kChunk, COLS) tile of rows t0... of p (row stride sl): column
// `col`, 0 past `length` or where !col_ok. FULL: the whole chunk lies before `length`, so the loads
// need no row guards (a guard per load was most of the instructions of this function).
template <int COLS, bool FULL, typename T, int K>
__device__ __forceinline__ void load_tile(const T* p, int64_t sl, int t0, int length, int col, bool col_ok, float (&v)[K]) {
    constexpr int kRowsPerPass = kThreads / COLS;
    const int r0 = t0 + static_cast<int>(threadIdx.x) / COLS;
    const int end = FULL ? t0 + kChunk : min(length, t0 + kChunk);
    const T* q = p + (int64_t)r0 * sl + col;
#pragma unroll
    for (int k = 0; k < K; k++, q += kRowsPerPass * sl) {
        const bool row_ok = (FULL && kChunk * COLS >= kThreads) || r0 + k * kRowsPerPass < end;
        v[k] = col_ok && row_ok ? to_f(*q) : 0.0f;
    }
}

// MAXN: states per thread (n / kSplit rounded up, as a compile-time constant so the state lives in
// registers; missing states are padded with A = 0, B = C = 0 and stay 0, so the inner loop has no
// branches). A block is kChannels channels of one sequence. Per chunk of kChunk steps, the block
// stages B, C, (dt, dt * u), D * u and silu(z) in shared memory from loads issued during the
// previous chunk's arithmetic; padded steps have dt = 0 and leave the state unchanged. Each lane
// then walks the steps with its states in registers, and every kSplit steps the lanes of a channel
// reduce-scatter their partial outputs, so that each lane finishes and writes one step's output.
template <typename T, int MAXN>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_kernel(ScanArgs a) {
    constexpr int kWidth = kSplit * MAXN;  // padded state size
    constexpr int kLoadsBC = tile_loads(kWidth);
    constexpr int kLoadsU = tile_loads(kChannels);
    __shared__ __align__(16) float sB[kChunk][kWidth];
    __shared__ __align__(16) float sC[kChunk][kWidth];
    __shared__ float2 sDtU[kChunk][kChannels];  // (dt, dt * u)
    __shared__ float sDu[kChunk][kChannels];    // D * u
    __shared__ float sZ[kChunk][kChannels];     // silu(z), or 1
    const int b = blockIdx.x;
    const int part = threadIdx.x % kSplit;
    const int local = threadIdx.x / kSplit;
    const int c0 = blockIdx.y * kChannels;
    const int c = c0 + local;
    const bool active = c < a.dim;
    const int n0 = part * MAXN;
    float h[MAXN], A2[MAXN];  // state; A * log2(e)
#pragma unroll
    for (int i = 0; i < MAXN; i++) {
        const bool ok = active && n0 + i < a.nstate;
        h[i] = ok ? a.state[((int64_t)b * a.dim + c) * a.nstate + n0 + i] : 0.0f;
        A2[i] = ok ? a.A[(int64_t)c * a.nstate + n0 + i] * kLog2e : 0.0f;
    }
    const T* u = static_cast<const T*>(a.u) + b * a.u_sb;
    const T* delta = static_cast<const T*>(a.delta) + b * a.d_sb;
    const T* Bp = static_cast<const T*>(a.B) + b * a.b_sb;
    const T* Cp = static_cast<const T*>(a.C) + b * a.c_sb;
    const T* z = a.z ? static_cast<const T*>(a.z) + b * a.z_sb : nullptr;
    T* y = static_cast<T*>(a.y) + (int64_t)b * a.length * a.dim;
    float rb[kLoadsBC], rc[kLoadsBC], ru[kLoadsU], rd[kLoadsU], rz[kLoadsU];  // the next chunk, in flight
    const int cg = min(c0 + static_cast<int>(threadIdx.x) % kChannels, a.dim - 1);  // this thread's column of the u, dt, z tiles
    const int n_col = threadIdx.x % kWidth;  // and of the B, C tiles
    const float bias = a.delta_bias ? to_f(static_cast<const T*>(a.delta_bias)[cg]) : 0.0f;  // loaded once, not per chunk
    const float Dc = a.D ? a.D[cg] : 0.0f;
    auto load_as = [&](auto full, int t0) {
        constexpr bool kFull = decltype(full)::value;
        load_tile<kWidth, kFull>(Bp, a.b_sl, t0, a.length, n_col, n_col < a.nstate, rb);
        load_tile<kWidth, kFull>(Cp, a.c_sl, t0, a.length, n_col, n_col < a.nstate, rc);
        load_tile<kChannels, kFull>(u, a.u_sl, t0, a.length, cg, true, ru);
        load_tile<kChannels, kFull>(delta, a.d_sl, t0, a.length, cg, true, rd);
        if (z) load_tile<kChannels, kFull>(z, a.z_sl, t0, a.length, cg, true, rz);
    };
    auto load = [&](int t0) {
        if (t0 + kChunk <= a.length) load_as(std::true_type{}, t0);
        else load_as(std::false_type{}, t0);
    };
    load(0);
    for (int t0 = 0; t0 < a.length; t0 += kChunk) {
        __syncthreads();  // the previous chunk is consumed
#pragma unroll
        for (int k = 0; k < kLoadsBC; k++) {
            const int t = threadIdx.x / kWidth + k * (kThreads / kWidth);
            if (t < kChunk) {
                sB[t][n_col] = rb[k];
                sC[t][n_col] = rc[k];
            }
        }
#pragma unroll
        for (int k = 0; k < kLoadsU; k++) {
            const int t = threadIdx.x / kChannels + k * (kThreads / kChannels), cl = threadIdx.x % kChannels;
            const float dt = softplus_for<T>(rd[k] + bias) * (t0 + t < a.length ? 1.0f : 0.0f);  // a select, not a branch
            sDtU[t][cl] = make_float2(dt, dt * ru[k]);
            sDu[t][cl] = Dc * ru[k];
            sZ[t][cl] = z ? silu_for<T>(rz[k]) : 1.0f;
        }
        __syncthreads();
        if (t0 + kChunk < a.length) load(t0 + kChunk);
        const int steps = min(kChunk, a.length - t0);
        for (int g = 0; g < steps; g += kSplit) {
            float acc[kSplit];
#pragma unroll
            for (int s = 0; s < kSplit; s++) {
                const float2 du = sDtU[g + s][local];
                float Bv[MAXN], Cv[MAXN];
                load_row(&sB[g + s][n0], Bv);
                load_row(&sC[g + s][n0], Cv);
                float part_sum[2] = {0.0f, 0.0f};  // two chains: half the dependent FMAs per step
#pragma unroll
                for (int i = 0; i < MAXN; i++) {
                    const float decay = exp2_for<T>(du.x * A2[i]);
                    h[i] = fmaf(decay, h[i], du.y * Bv[i]);
                    part_sum[i % 2] = fmaf(h[i], Cv[i], part_sum[i % 2]);
                }
                acc[s] = part_sum[0] + part_sum[1];
            }
            const float sum = reduce_scatter(acc, part);
            const int t = g + part;
            if (active && t < steps) y[(int64_t)(t0 + t) * a.dim + c] = from_f<T>((sum + sDu[t][local]) * sZ[t][local]);
        }
    }
    if (active) {
#pragma unroll
        for (int i = 0; i < MAXN; i++)
            if (n0 + i < a.nstate) a.state[((int64_t)b * a.dim + c) * a.nstate + n0 + i] = h[i];
    }
}

struct ConvArgs {
    const void* x;
    const void *w, *bias;  // (d, k) and (d,) in x's dtype, as the model stores them
    void* state;
    void* y;
    int64_t x_sb, x_sl;
    int length, dim, kernel;
};

constexpr int kConvSteps = 64;  // time steps per thread
constexpr int kConvBatch = 8;   // inputs loaded before any is used: loads in flight per thread

// One thread: one channel, kConvSteps consecutive steps; inputs before the first step come from
// x itself or, at the start of the sequence, from the carried state. Inputs are loaded kConvBatch
// steps at a time before any output is stored (a store to y may alias x for the compiler, so a
// load after it would wait: one load in flight per thread left the kernel latency-bound).
template <typename T, int K>
__global__ void conv_kernel(ConvArgs a) {
    const int b = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x, t0 = blockIdx.z * kConvSteps;
    if (c >= a.dim) return;
    const T* x = static_cast<const T*>(a.x) + b * a.x_sb;
    T* st = static_cast<T*>(a.state) + ((int64_t)b * a.dim + c) * K;
    T* y = static_cast<T*>(a.y) + (int64_t)b * a.length * a.dim;
    float w[K], win[K];
#pragma unroll
    for (int j = 0; j < K; j++) {
        w[j] = to_f(static_cast<const T*>(a.w)[(int64_t)c * K + j]);
        const int t = t0 - K + j;  // the K inputs before t0; the state holds times -K..-1
        win[j] = t >= 0 ? to_f(x[(int64_t)t * a.x_sl + c]) : to_f(st[K + t]);
    }
    const float bias = a.bias ? to_f(static_cast<const T*>(a.bias)[c]) : 0.0f;
    const int t1 = min(a.length, t0 + kConvSteps);
    for (int tb = t0; tb < t1; tb += kConvBatch) {
        float in[kConvBatch];
#pragma unroll
        for (int i = 0; i < kConvBatch; i++) in[i] = tb + i < t1 ? to_f(x[(int64_t)(tb + i) * a.x_sl + c]) : 0.0f;
#pragma unroll
        for (int i = 0; i < kConvBatch; i++) {
#pragma unroll
            for (int j = 0; j + 1 < K; j++) win[j] = win[j + 1];
            win[K - 1] = in[i];
            float acc = bias;
#pragma unroll
            for (int j = 0; j < K; j++) acc += win[j] * w[j];
            if (tb + i < t1) y[(int64_t)(tb + i) * a.dim + c] = from_f<T>(silu(acc));
        }
    }
}

// After all conv blocks have read the old state: the new state is the last K inputs.
template <typename T, int K>
__global__ void conv_state_kernel(ConvArgs a) {
    const int b = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= a.dim) return;
    const T* x = static_cast<const T*>(a.x) + b * a.x_sb;
    T* st = static_cast<T*>(a.state) + ((int64_t)b * a.dim + c) * K;
    float v[K];
#pragma unroll
    for (int j = 0; j < K; j++) {  // input at time length - K + j; before 0 it is old state entry j + length
        const int t = a.length - K + j;
        v[j] = t >= 0 ? to_f(x[(int64_t)t * a.x_sl + c]) : to_f(st[j + a.length]);
    }
#pragma unroll
    for (int j = 0; j < K; j++) st[j] = from_f<T>(v[j]);
}

}  // namespace mamba
