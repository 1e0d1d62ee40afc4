// The building blocks of a decoded token, each over a range of its work items so that a caller can
// share them among threads: ATen's parallel_for in the single-op kernels (linear_cpu.cpp,
// mamba_cpu.cpp, decode_cpu.cpp), one OpenMP region for a whole token in model_cpu.cpp.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vec.h"

namespace mamba_cpu {

using c10::BFloat16;

constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the current weight the prefetch reads

// 16 int8 weights widened to float32 (with AVX-512: one sign extension and one convert; GCC's
// generic vector conversion of int8 is scalarised).
inline vf widen(const int8_t* p) {
#ifdef __AVX512F__
    return reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#else
    return load16(p);
#endif
}

// The dot product x . w of one row, k elements: X is the type x is read in (float32, or bf16
// for bf16 weights), W the weight type. Four independent accumulators over 64 elements per step
// (an array of accumulators was kept on the stack by GCC, every FMA waiting on a store).
template <typename X, typename W>
float dot(const X* x, const W* w, int64_t k) {
    constexpr int64_t kStep = 4 * kLanes;
    const int64_t body = k / kStep * kStep;
    float s;
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<W, BFloat16>) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int64_t i = 0; i < body; i += kStep) {  // 64 bf16 = two lines: two vdpbf16ps of 32 pairs
            __builtin_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes, 0, 2);
            __builtin_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes + 64, 0, 2);
            a0 = _mm512_dpbf16_ps(a0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i)), reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + i)));
            a1 = _mm512_dpbf16_ps(a1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i + 32)),
                                  reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + i + 32)));
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    } else
#endif
    {
        vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t i = 0; i < body; i += kStep) {
            for (int64_t line = 0; line < kStep * static_cast<int64_t>(sizeof(W)); line += 64)
                __builtin_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes + line, 0, 2);
            if constexpr (std::is_same_v<W, int8_t>) {
                a0 += load16(x + i) * widen(w + i);
                a1 += load16(x + i + kLanes) * widen(w + i + kLanes);
                a2 += load16(x + i + 2 * kLanes) * widen(w + i + 2 * kLanes);
                a3 += load16(x + i + 3 * kLanes) * widen(w + i + 3 * kLanes);
            } else {
                a0 += load16(x + i) * load16(w + i);
                a1 += load16(x + i + kLanes) * load16(w + i + kLanes);
                a2 += load16(x + i + 2 * kLanes) * load16(w + i + 2 * kLanes);
                a3 += load16(x + i + 3 * kLanes) * load16(w + i + 3 * kLanes);
            }
        }
        s = hsum((a0 + a1) + (a2 + a3));
    }
    for (int64_t i = body; i < k; i++) s += static_cast<float>(x[i]) * static_cast<float>(w[i]);
    return s;
}

// Rows of 16-bit activations quantized to int16 for an int8 product: q = round(x / scale) with
// scale = max|x| / 32767 per row. With AVX512-VNNI, 32 int8 weights then take two instructions
// (vpmovsxbw, vpdpwssd) instead of 16 taking three (sign extension, conversion, FMA against float32
// x): +8% int8 decoding (perf notes, CPU 26; the rest of its gap to bf16's bytes per second is not
// the arithmetic). The quantization's
// error (<= 2^-16 of the row's largest value per element) is far below both the bf16 rounding the
// row already carries and the int8 weights' own (<= 2^-8 of their row's largest value).
template <typename X>
void quantize_rows(const X* x, int64_t m, int64_t k, int16_t* q, float* scale) {
    for (int64_t i = 0; i < m; i++) {
        const X* row = x + i * k;
        int16_t* out = q + i * k;
        int64_t j = 0;
        float amax = 0.0f;
        bool nan = false;  // max() drops NaNs; a row with one gets a NaN scale, so its products are NaN
#ifdef __AVX512F__
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 unordered = 0;
        for (; j + kLanes <= k; j += kLanes) {
            const __m512 v = reinterpret_cast<__m512>(load16(row + j));
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
            unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        amax = _mm512_reduce_max_ps(vmax);
        nan = unordered != 0;
#endif
        for (; j < k; j++) {
            const float v = static_cast<float>(row[j]);
            amax = std::max(amax, std::fabs(v));
            nan = nan || std::isnan(v);
        }
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        scale[i] = nan ? std::nanf("") : amax / 32767.0f;
        j = 0;
#ifdef __AVX512F__
        const __m512 vinv = _mm512_set1_ps(inv);  // |x| inv <= 32767 (+ rounding): cvtsepi32 saturates
        for (; j + kLanes <= k; j += kLanes)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(reinterpret_cast<__m512>(load16(row + j)), vinv))));
#endif
        for (; j < k; j++) out[j] = static_cast<int16_t>(std::clamp(std::nearbyint(static_cast<float>(row[j]) * inv), -32767.0f, 32767.0f));
    }
}

// x . w for int16 x and int8 w, summed exactly in integers and returned as float. With AVX512-VNNI
// each int32 lane gains at most 2 x 127 x 32767 per vpdpwssd, so the lanes are moved to float32
// every 4,096 elements (128 instructions per lane: < 2^30 in each of the two accumulators).
inline float dot_q(const int16_t* x, const int8_t* w, int64_t k) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    constexpr int64_t kStep = 64, kFlush = 4096;
    const int64_t body = k / kStep * kStep;
    __m512 f = _mm512_setzero_ps();
    while (i < body) {
        const int64_t stop = std::min(body, i + kFlush);
        __m512i a0 = _mm512_setzero_si512(), a1 = a0;
        for (; i < stop; i += kStep) {  // 64 weights: one line
            __builtin_prefetch(reinterpret_cast<const char*>(w + i) + kPrefetchBytes, 0, 2);
            a0 = _mm512_dpwssd_epi32(a0, _mm512_loadu_si512(x + i), _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i))));
            a1 = _mm512_dpwssd_epi32(a1, _mm512_loadu_si512(x + i + 32),
                                     _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 32))));
        }
        f = _mm512_add_ps(f, _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)));
    }
    s = _mm512_reduce_add_ps(f);
#endif
    int64_t tail = 0;
    for (; i < k; i++) tail += static_cast<int32_t>(x[i]) * static_cast<int32_t>(w[i]);
    return s + static_cast<float>(tail);
}

// Rows begin..end of y (m, n) = x (m, k) @ w (n, k)^T (* scale) (+ bias): one thread's share of a
// product, rows of W streamed in order. x_scale: x's row scales when x is quantized (int16).
template <typename X, typename W, typename Y>
void gemv_range(const X* x, int64_t m, int64_t k, const W* w, int64_t n, const float* scale, const float* bias, Y* y, int64_t begin, int64_t end,
                const float* x_scale = nullptr) {
    for (int64_t r = begin; r < end; r++)
        for (int64_t i = 0; i < m; i++) {
            float v;
            if constexpr (std::is_same_v<X, int16_t>)
                v = dot_q(x + i * k, w + r * k, k) * x_scale[i];
            else
                v = dot(x + i * k, w + r * k, k);
            if (scale != nullptr) v *= scale[r];
            if (bias != nullptr) v += bias[r];
            y[i * n + r] = static_cast<Y>(v);
        }
}

// Rows begin..end: s = residual + x (in R), out = weight * T(s' * rsqrt(mean(s'^2) + eps)) with
// s' = T(s) if cast_input: the roundings of transformers' torch code (ops/reference.py: add_rms_norm).
template <typename T, typename R>
void add_rms_norm_range(const T* x, const R* residual, const T* weight, T* out, R* res_out, int64_t h, float eps, bool cast_input, int64_t begin,
                        int64_t end) {
    for (int64_t row = begin; row < end; row++) {
        const T* xr = x + row * h;
        const R* rr = residual != nullptr ? residual + row * h : nullptr;
        R* sr = res_out + row * h;
        T* orow = out + row * h;
        // s' as the norm reads it: T(s) when cast_input, s (already rounded to R) otherwise
        auto normed_input = [&](vf s) { return cast_input ? round_as<T>(s) : s; };
        vf ssv = {};
        for (int64_t i = 0; i < h; i += kLanes) {  // 16 lanes at a time; the sum of squares in 16 partial sums
            const int64_t w = std::min(kLanes, h - i);
            const vf s = round_as<R>(rr != nullptr ? load_tile(rr + i, w) + load_tile(xr + i, w) : load_tile(xr + i, w));
            store_tile(sr + i, s, w);
            const vf v = normed_input(s);
            ssv += v * v;
        }
        const float scale = 1.0f / std::sqrt(hsum(ssv) / static_cast<float>(h) + eps);
        for (int64_t i = 0; i < h; i += kLanes) {
            const int64_t w = std::min(kLanes, h - i);
            const vf v = normed_input(load_tile(sr + i, w));
            store_tile(orow + i, load_tile(weight + i, w) * round_as<T>(v * scale), w);
        }
    }
}

// One decoded token of the conv, items begin..end of (batch x channels): per channel, shift its
// state row (k,) left, append x, and y = silu(<row, weight row> + bias). Scalar per channel (k multiply-adds): at one token the
// tile set-up of the prompt path (state and weights transposed into 16-lane windows) cost 5x more.
template <typename T>
void conv_step_range(const T* x, int64_t x_sb, const T* weight, const T* bias, T* state, T* y, int64_t dim, int64_t kernel, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {  // i = b * dim + c
        const int64_t b = i / dim, c = i % dim;
        T* row = state + i * kernel;  // (k,) oldest first
        const T* w = weight + c * kernel;
        float acc = bias != nullptr ? static_cast<float>(bias[c]) : 0.0f;
        for (int64_t j = 0; j + 1 < kernel; j++) {
            row[j] = row[j + 1];
            acc += static_cast<float>(row[j]) * static_cast<float>(w[j]);
        }
        row[kernel - 1] = x[b * x_sb + c];
        acc += static_cast<float>(row[kernel - 1]) * static_cast<float>(w[kernel - 1]);
        y[i] = static_cast<T>(acc / (1.0f + std::exp(-acc)));
    }
}

// One tile of a decode step: channels c0 .. c0+rows-1 (rows <= 16) of one sequence, whose u, z, B,
// C, state and y the pointers already address. dt = softplus(T(dt_low . dt_weight[c]) + bias[c]) as
// the unfused path rounds it (bias may be null), then for each channel its state row (n,), contiguous:
// h = exp(dt A) h + dt u B, y = <h, C> + D u, gated by silu(z). Per-channel values live in 16-lane
// vectors filled through small arrays (a vector lane chosen at run time is a store and a reload).
template <typename T>
void decode_tile(int64_t c0, int64_t rows, int64_t rank, int64_t nstate, const float* lowf, const T* wp, const float* bias,
                 const T* up, const T* zp, const T* Bp, const T* Cp, const float* Ap, const float* Dp, float* hp, T* yp) {
    alignas(64) float raw[kLanes] = {}, sums[kLanes] = {}, dts[kLanes];
    for (int64_t r = 0; r < rows; r++) {  // dt_proj: a dot product over the rank per channel
        const T* w = wp + (c0 + r) * rank;
        vf acc = {};
        for (int64_t j = 0; j < rank; j += kLanes) acc += load_tile(lowf + j, std::min(kLanes, rank - j)) * load_tile(w + j, std::min(kLanes, rank - j));
        raw[r] = static_cast<float>(static_cast<T>(hsum(acc))) + (bias != nullptr ? bias[c0 + r] : 0.0f);
    }
    const vf dt = softplus_for<T>(load16(raw));
    std::memcpy(dts, &dt, sizeof(dts));
    const vf u = load_tile(up + c0, rows);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t c = c0 + r;
        const float du = dts[r] * static_cast<float>(up[c0 + r]);
        float* h = hp + c * nstate;  // (n,)
        vf acc = {};
        for (int64_t n0 = 0; n0 < nstate; n0 += kLanes) {
            const int64_t width = std::min(kLanes, nstate - n0);
            vf hv = load_tile(h + n0, width);
            const vf a2 = load_tile(Ap + c * nstate + n0, width) * kLog2e;  // as the scan rounds it
            hv = vexp2_decay(dts[r] * a2) * hv + du * load_tile(Bp + n0, width);
            store_tile(h + n0, hv, width);
            acc += hv * load_tile(Cp + n0, width);
        }
        sums[r] = hsum(acc);
    }
    vf out = load16(sums);
    if (Dp != nullptr) out += load_tile(Dp + c0, rows) * u;
    if (zp != nullptr) {
        const vf zv = load_tile(zp + c0, rows);
        out *= silu_for<T>(zv);
    }
    store_tile(yp + c0, out, rows);
}

// A decode step's per-sequence inputs: sequence b's rows start at pointer + b * stride; z may be null.
template <typename T>
struct StepRows {
    const T *u, *z, *dt_low, *B, *C;
    int64_t u_sb, z_sb, dt_low_sb, b_sb, c_sb;
};

// Items begin..end of (batch x tiles of 16 channels) of a decode step (see decode_tile), dt_low
// widened to float32 once per sequence; state (b, d, n) and y (b, d) contiguous.
template <typename T>
void decode_tiles(int64_t begin, int64_t end, int64_t dim, int64_t rank, int64_t nstate, const StepRows<T>& in, const T* dt_w, const float* bias,
                  const float* A, const float* D, float* state, T* y) {
    const int64_t tiles = (dim + kLanes - 1) / kLanes;
    float lowf[256];
    int64_t lowb = -1;  // the sequence whose dt_low is in lowf
    for (int64_t i = begin; i < end; i++) {
        const int64_t b = i / tiles, c0 = (i % tiles) * kLanes;
        if (b != lowb) {
            for (int64_t j = 0; j < rank; j++) lowf[j] = static_cast<float>(in.dt_low[b * in.dt_low_sb + j]);
            lowb = b;
        }
        decode_tile<T>(c0, std::min(kLanes, dim - c0), rank, nstate, lowf, dt_w, bias, in.u + b * in.u_sb, in.z != nullptr ? in.z + b * in.z_sb : nullptr,
                       in.B + b * in.b_sb, in.C + b * in.c_sb, A, D, state + b * dim * nstate, y + b * dim);
    }
}

}  // namespace mamba_cpu
