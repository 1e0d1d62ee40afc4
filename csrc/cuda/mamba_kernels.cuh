// Device code shared by the CUDA kernels (no torch here: scan.cu, decode.cu and gemm.cu launch them,
// see ops.h): conversions, vector loads, the numerics by input type; and the prompt's causal conv.
#pragma once
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mamba {

constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// How N consecutive values of T move as vectors: 16-byte pieces where they fill whole ones, else
// 8-byte pieces, else none (kBytes 0: one by one).
template <int N, typename T>
struct Pieces {
    static constexpr int kAll = N * static_cast<int>(sizeof(T));
    static constexpr int kBytes = kAll % 16 == 0 ? 16 : kAll % 8 == 0 ? 8 : 0;
    static constexpr int kElems = kBytes / static_cast<int>(sizeof(T));
    using Type = typename std::conditional<kBytes == 8, uint2, uint4>::type;
};

// N consecutive values at p, as Pieces where `aligned` says p is aligned to a piece, else one by one:
// the decode step's state, B and C rows of a lane, the scan's tiles and shared-memory rows. A
// register's address works too (unpacking a piece).
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, bool aligned, float (&v)[N]) {
    using P = Pieces<N, T>;
    if constexpr (P::kBytes > 0) {
        if (aligned) {
#pragma unroll
            for (int i = 0; i < N; i += P::kElems) {
                const typename P::Type q = *reinterpret_cast<const typename P::Type*>(p + i);
                const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
                for (int j = 0; j < P::kElems; j++) v[i + j] = to_f(e[j]);
            }
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < N; i++) v[i] = to_f(p[i]);
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, bool aligned, const float (&v)[N]) {
    using P = Pieces<N, T>;
    if constexpr (P::kBytes > 0) {
        if (aligned) {
#pragma unroll
            for (int i = 0; i < N; i += P::kElems) {
                typename P::Type q;
                T* e = reinterpret_cast<T*>(&q);
#pragma unroll
                for (int j = 0; j < P::kElems; j++) e[j] = from_f<T>(v[i + j]);
                *reinterpret_cast<typename P::Type*>(p + i) = q;
            }
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < N; i++) p[i] = from_f<T>(v[i]);
}

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
