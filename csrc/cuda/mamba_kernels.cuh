// CUDA kernels for Mamba (no torch here: mamba_cuda.cu binds them), see mamba_cuda.cu's header.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mamba {

#ifndef MAMBA_SCAN_SPLIT
#define MAMBA_SCAN_SPLIT 8  // benchmarks/scan_variants.py builds other values to compare (8: fastest on an H200)
#endif
constexpr int kSplit = MAMBA_SCAN_SPLIT;  // threads per channel, each holding n / kSplit of its states
constexpr int kThreads = 128;  // threads per block
constexpr int kChannels = kThreads / kSplit;  // channels per block
constexpr int kChunk = 32;     // time steps staged in shared memory at once

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// softplus in double: an error in dt is multiplied by |dt * A| (up to ~30) in the decay exp(dt * A),
// so dt must be correctly rounded; this runs once per (step, channel), off the sequential path.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : static_cast<float>(log1p(exp(static_cast<double>(x)))); }
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// exp for the decays: Cephes expf's range reduction and polynomial, all FMAs (about 1 ulp, and
// unbiased, unlike expf's hardware approximation, whose small bias compounds along a long product
// of decays), the same arithmetic as the CPU kernel. The argument is <= 0 here.
__device__ __forceinline__ float exp_decay(float x) {
    x = fmaxf(x, -87.3f);
    const float n = rintf(x * 1.44269504088896341f);
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, x));
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    return p * __int_as_float((static_cast<int>(n) + 127) << 23);
}

struct ScanArgs {
    const void *u, *delta, *B, *C, *z;
    const float *A, *D;
    const void* delta_bias;  // (d,) in the inputs' dtype, as the model stores it
    float* state;
    void* y;
    int64_t u_sb, u_sl, d_sb, d_sl, b_sb, b_sl, c_sb, c_sl, z_sb, z_sl;
    int length, dim, nstate;
};

// MAXN: states per thread (n / kSplit rounded up, as a compile-time constant so the state lives
// in registers; missing states are padded with A = 0, B = C = 0 and stay 0, so the inner loop has
// no branches). Each chunk of kChunk steps first stages u, softplus(delta + bias), silu(z), B and C
// in shared memory with coalesced loads by the whole block, so the sequential loop never waits on
// global memory; then each thread walks the steps, and the block writes the chunk's outputs.
template <typename T, int MAXN>
__global__ void __launch_bounds__(kThreads, 4) scan_kernel(ScanArgs a) {
    constexpr int kWidth = kSplit * MAXN;  // padded state size
    __shared__ float sB[kChunk][kWidth];
    __shared__ float sC[kChunk][kWidth];
    __shared__ float sU[kChunk][kChannels];
    __shared__ float sDt[kChunk][kChannels];
    __shared__ float sZ[kChunk][kChannels];
    __shared__ float sY[kSplit][kChunk][kChannels];  // partial outputs of the kSplit threads of a channel
    const int b = blockIdx.x;
    const int part = threadIdx.x % kSplit;
    const int local = threadIdx.x / kSplit;
    const int c0 = blockIdx.y * kChannels;
    const int c = c0 + local;
    const bool active = c < a.dim;
    const int n0 = part * MAXN;
    float h[MAXN], Ac[MAXN];
#pragma unroll
    for (int i = 0; i < MAXN; i++) {
        const bool ok = active && n0 + i < a.nstate;
        h[i] = ok ? a.state[((int64_t)b * a.dim + c) * a.nstate + n0 + i] : 0.0f;
        Ac[i] = ok ? a.A[(int64_t)c * a.nstate + n0 + i] : 0.0f;
    }
    const T* u = static_cast<const T*>(a.u) + b * a.u_sb;
    const T* delta = static_cast<const T*>(a.delta) + b * a.d_sb;
    const T* Bp = static_cast<const T*>(a.B) + b * a.b_sb;
    const T* Cp = static_cast<const T*>(a.C) + b * a.c_sb;
    const T* z = a.z ? static_cast<const T*>(a.z) + b * a.z_sb : nullptr;
    T* y = static_cast<T*>(a.y) + (int64_t)b * a.length * a.dim;
    constexpr int kLoadsBC = kChunk * kWidth / kThreads > 0 ? (kChunk * kWidth + kThreads - 1) / kThreads : 1;
    constexpr int kLoadsU = kChunk * kChannels / kThreads;
    for (int t0 = 0; t0 < a.length; t0 += kChunk) {
        const int steps = min(kChunk, a.length - t0);
        // Issue every global load of the chunk first (independent, so their latencies overlap) ...
        float rb[kLoadsBC], rc[kLoadsBC], ru[kLoadsU], rd[kLoadsU], rz[kLoadsU];
#pragma unroll
        for (int k = 0; k < kLoadsBC; k++) {
            const int i = threadIdx.x + k * kThreads, t = i / kWidth, n = i % kWidth;
            const bool ok = t < steps && n < a.nstate;
            rb[k] = ok ? to_f(Bp[(int64_t)(t0 + t) * a.b_sl + n]) : 0.0f;
            rc[k] = ok ? to_f(Cp[(int64_t)(t0 + t) * a.c_sl + n]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < kLoadsU; k++) {
            const int i = threadIdx.x + k * kThreads, t = i / kChannels, cg = min(c0 + i % kChannels, a.dim - 1);
            const int64_t tt = min(t0 + t, a.length - 1);
            ru[k] = to_f(u[tt * a.u_sl + cg]);
            rd[k] = to_f(delta[tt * a.d_sl + cg]) + (a.delta_bias ? to_f(static_cast<const T*>(a.delta_bias)[cg]) : 0.0f);
            rz[k] = z ? to_f(z[tt * a.z_sl + cg]) : 0.0f;
        }
        __syncthreads();  // ... then wait until the previous chunk is consumed, and stage this one
#pragma unroll
        for (int k = 0; k < kLoadsBC; k++) {
            const int i = threadIdx.x + k * kThreads;
            if (i < kChunk * kWidth) {
                sB[i / kWidth][i % kWidth] = rb[k];
                sC[i / kWidth][i % kWidth] = rc[k];
            }
        }
#pragma unroll
        for (int k = 0; k < kLoadsU; k++) {
            const int i = threadIdx.x + k * kThreads, t = i / kChannels, cl = i % kChannels;
            sU[t][cl] = ru[k];
            sDt[t][cl] = softplus(rd[k]);
            sZ[t][cl] = z ? silu(rz[k]) : 1.0f;
        }
        __syncthreads();
        // The sequential part: only h is carried from step to step; partial outputs go to shared
        // memory and are summed over the kSplit threads of a channel after the chunk.
#pragma unroll 4
        for (int t = 0; t < steps; t++) {
            const float dt = sDt[t][local];
            const float du = dt * sU[t][local];
            float acc = 0.0f;
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
                h[i] = exp_decay(dt * Ac[i]) * h[i] + du * sB[t][n0 + i];
                acc += h[i] * sC[t][n0 + i];
            }
            sY[part][t][local] = acc;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < steps * kChannels; i += kThreads) {
            const int t = i / kChannels, cl = i % kChannels, cg = c0 + cl;
            if (cg < a.dim) {
                float acc = 0.0f;
#pragma unroll
                for (int p = 0; p < kSplit; p++) acc += sY[p][t][cl];
                const float dskip = a.D ? a.D[cg] : 0.0f;
                y[(int64_t)(t0 + t) * a.dim + cg] = from_f<T>((acc + dskip * sU[t][cl]) * sZ[t][cl]);
            }
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

// One thread: one channel, kConvSteps consecutive steps; inputs before the first step come from
// x itself or, at the start of the sequence, from the carried state.
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
    for (int t = t0; t < t1; t++) {
#pragma unroll
        for (int j = 0; j + 1 < K; j++) win[j] = win[j + 1];
        win[K - 1] = to_f(x[(int64_t)t * a.x_sl + c]);
        float acc = bias;
#pragma unroll
        for (int j = 0; j < K; j++) acc += win[j] * w[j];
        y[(int64_t)t * a.dim + c] = from_f<T>(silu(acc));
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
