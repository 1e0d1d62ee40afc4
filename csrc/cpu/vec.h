// 16-float vectors for the CPU kernels (GCC/Clang vector extensions) and the exp they share.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace mamba_cpu {

constexpr int64_t kLanes = 16;

// 16 floats as one value: GCC/Clang vector extensions compile this to one AVX-512 or two AVX2
// instructions per operation, with no reliance on the auto-vectoriser.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr float kLog2e = 1.44269504088896341f;

// The polynomial with coefficients c (highest degree first) at x, by Horner's rule: one
// multiply-add per coefficient (fused: the kernels build with -ffp-contract=fast).
template <size_t N>
inline vf horner(vf x, const float (&c)[N]) {
    vf p = vf{} + c[0];
    for (size_t i = 1; i < N; i++) p = p * x + c[i];
    return p;
}

// exp(x) for 16 lanes: Cephes expf's range reduction and polynomial (about 1 ulp).
inline vf vexp(vf x) {
    const vf lo = vf{} - 87.3f, hi = vf{} + 88.3f, magic = vf{} + 12582912.0f;  // 1.5 * 2^23 rounds to nearest
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const vf n = (x * kLog2e + magic) - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, two-part constant
    vf p = horner(r, {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f});
    p = p * r * r + r + 1.0f;  // exp(r) ~ 1 + r + r^2 p(r) for |r| <= ln(2) / 2
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
    return p * reinterpret_cast<const vf&>(bits);
}

// 2^x for x in [-125, 126] (the caller clamps): k = round(x) by the 1.5 * 2^23 shift, 2^f for
// f = x - k in [-1/2, 1/2] by a polynomial, and 2^k by adding k << 23 to its bits (the shift's low
// mantissa bits are k; shifting them left by 23 drops the rest). Degree 6, a weighted Chebyshev fit:
// relative error 1.0e-7, mean 4e-10 (about 1 ulp and unbiased, as Cephes' exp); degree 4, for the
// softplus and silu of 16-bit inputs: 2.7e-6, mean -6e-9 (their own rounding is 3.9e-3).
// With AVX-512 DQ, f comes from one vreduceps and 2^k from one vscalefps (10 operations instead of
// 12 for the decays, the same bits: both round k to nearest even, both scale exactly).
template <int Degree>
inline vf vexp2_clamped(vf x) {
    static_assert(Degree == 4 || Degree == 6, "fitted degrees: 4 and 6");
#ifdef __AVX512DQ__
    const vf f = reinterpret_cast<vf>(_mm512_reduce_ps(reinterpret_cast<__m512>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    const vf shifted = x + 12582912.0f;
    const vf f = x - (shifted - 12582912.0f);
#endif
    const vf p = Degree == 6 ? horner(f, {1.5337577497e-4f, 1.3399859890e-3f, 9.6185198054e-3f, 5.5503290147e-2f, 2.4022646248e-1f, 6.9314718246e-1f, 1.0f})
                             : horner(f, {9.5605105162e-3f, 5.5917039514e-2f, 2.4024981260e-1f, 6.9312196970e-1f, 9.9999916553e-1f});
#ifdef __AVX512DQ__
    return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(x - f)));  // p * 2^(x - f)
#else
    const vi bits = reinterpret_cast<const vi&>(p) + (reinterpret_cast<const vi&>(shifted) << 23);
    return reinterpret_cast<const vf&>(bits);
#endif
}

// max(x, lo) per lane: one instruction with AVX-512 (GCC's generic select takes a compare and a blend).
inline vf vmax(vf x, float lo) {
#ifdef __AVX512F__
    return reinterpret_cast<vf>(_mm512_max_ps(reinterpret_cast<__m512>(x), _mm512_set1_ps(lo)));
#else
    return x < lo ? vf{} + lo : x;
#endif
}

// 2^x for x <= 0: the decays exp(dt A) of the scan and the decode step, computed as 2^(dt A log2 e)
// with log2(e) folded into A once, for every input type (degree 4 for 16-bit inputs was 10% faster
// but its error, though unbiased on average, has one sign for a channel's typical dt A and compounds
// along the state: 6e-5 after 300 steps, against 8e-7). In the fewest vector operations (10; 12 without AVX-512 DQ), since
// on a 2-vCPU host (one core's vector ports) the prompt scan is bound by how many it issues: one max
// (x >= -125, so that the result stays a normal float) and vexp2_clamped. Cephes' exp took 15.
inline vf vexp2_decay(vf x) { return vexp2_clamped<6>(vmax(x, -125.0f)); }

// 1 / x for 16 lanes, x > 0: with AVX-512 the 14-bit estimate and one Newton step (about 1 ulp;
// a 512-bit division is one instruction of ~16 cycles' throughput, a quarter of the conv's time).
inline vf vrecip(vf x) {
#ifdef __AVX512F__
    const vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
    return r * (2.0f - x * r);
#else
    return 1.0f / x;
#endif
}

// silu(x) = x / (1 + exp(-x)) for 16 lanes.
inline vf vsilu(vf x) { return x * vrecip(1.0f + vexp(vf{} - x)); }

// log(x) for 16 lanes, x > 0 finite: Cephes logf's reduction to a mantissa in [sqrt(1/2), sqrt(2))
// and its polynomial (about 1 ulp).
inline vf vlog(vf x) {
    const vi bits = reinterpret_cast<const vi&>(x);
    vf e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf);  // x = m * 2^e, m in [1/2, 1)
    const vi mbits = (bits & static_cast<int32_t>(0x807fffffu)) | 0x3f000000;
    vf m = reinterpret_cast<const vf&>(mbits);
    const auto small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;  // now log(x) = log(1 + m) + e log(2)
    const vf z = m * m;
    const vf p = horner(m, {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                            2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f});
    vf y = p * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e;
}

// softplus(x) = log(1 + exp(x)) for 16 lanes, as torch's (linear above 20); log1p by
// log(u) * e / (u - 1) with u = 1 + e (exact to a few ulp even where u rounds to nearly 1).
inline vf vsoftplus(vf x) {
    const vf e = vexp(x), u = 1.0f + e;
    const vf d = u - 1.0f;
    const vf l = vlog(u) * e / (d == 0.0f ? vf{} + 1.0f : d);
    return x > 20.0f ? x : (d == 0.0f ? e : l);
}

// For 16-bit inputs (3-4 significant digits): exp by vexp2_clamped<4> and no division. softplus
// as max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1] and log1p(e) = e q(e), q a degree-6 fit of
// log1p(e) / e on [0, 1] (relative error 1.4e-6 in float32): relative error <= 6e-6 over x > -80
// with the exp's (which grows with |x| through x log2(e)'s rounding), in 19 vector operations;
// the form by Cephes' log took ~40 for 1.1e-5. silu with vrecip.
inline vf vsoftplus_fast(vf x) {
#ifdef __AVX512F__
    const vf a = reinterpret_cast<vf>(_mm512_abs_ps(reinterpret_cast<__m512>(x)));
#else
    const vf a = x < 0.0f ? vf{} - x : x;
#endif
    const vf e = vexp2_clamped<4>(vmax(a * -kLog2e, -125.0f));
    const vf q = horner(e, {1.4141022228e-2f, -6.6401809454e-2f, 1.4922389388e-1f, -2.3503862321e-1f, 3.3109450340e-1f, -4.9986964464e-1f,
                            9.9999874830e-1f});
    return vmax(x, 0.0f) + e * q;
}
inline vf vsilu_fast(vf x) {
    const vf t = x * -kLog2e;
    const vf e = vexp2_clamped<4>(vmax(t > 126.0f ? vf{} + 126.0f : t, -125.0f));
    return x * vrecip(1.0f + e);
}

// The numerics by input type, shared by the prompt scan and the decode step so that both agree (as
// on the GPU, csrc/cuda/mamba_kernels.cuh): float32 inputs take the exact functions; bf16/fp16
// inputs, whose rounding is 3.9e-3, the faster ones above (the scan -7%; perf notes, CPU 20).
template <typename T>
inline vf softplus_for(vf x) { return std::is_same_v<T, float> ? vsoftplus(x) : vsoftplus_fast(x); }
template <typename T>
inline vf silu_for(vf x) { return std::is_same_v<T, float> ? vsilu(x) : vsilu_fast(x); }

// The sum of v's lanes by folding halves with shuffles: 4 dependent additions instead of 15.
inline float hsum(vf v) {
    typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
    typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// 16 consecutive values as floats: one vector load (and for bf16 a widening shift). Only these
// whole-vector paths are fast: GCC turns an element loop over floats into a memcpy call whose small
// stores then stall the vector load that reads them back (measured: 3x slower scan).
inline vf load16(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline vf load16(const c10::BFloat16* p) {
#ifdef __AVX512F__  // one zero-extending load and a shift (GCC's generic conversion below takes five instructions)
    return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
#else
    typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
    vh h;
    std::memcpy(&h, p, sizeof(h));
    const vu bits = __builtin_convertvector(h, vu) << 16;  // bf16 is the top half of a float32
    vf v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
#endif
}

template <typename T>
inline vf load16(const T* p) {
    vf v;
    for (int64_t c = 0; c < kLanes; c++) v[c] = static_cast<float>(p[c]);
    return v;
}

// The first `width` (<= 16) values as floats, zeros after.
template <typename T>
inline vf load_tile(const T* p, int64_t width) {
    if (width == kLanes) return load16(p);
    vf v = {};
    for (int64_t c = 0; c < width; c++) v[c] = static_cast<float>(p[c]);
    return v;
}

// v rounded to T's precision, as static_cast<T> rounds (bf16: to nearest even, NaN kept), as floats.
template <typename T>
inline vf round_as(vf v) {
    if constexpr (std::is_same_v<T, float>) {
        return v;
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // c10's round_to_nearest_even, on 16 lanes
        typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
        const vu bits = reinterpret_cast<const vu&>(v);
        const vu rounded = (bits + (0x7fffu + ((bits >> 16) & 1u))) & 0xffff0000u;
        const vu out = v != v ? vu{} + 0x7fc00000u : rounded;
        return reinterpret_cast<const vf&>(out);
    } else {
        for (int64_t c = 0; c < kLanes; c++) v[c] = static_cast<float>(static_cast<T>(v[c]));
        return v;
    }
}

// Store the first `width` lanes of v (rounded to T): whole vectors of float32 and bf16 without a
// scalar conversion per lane.
template <typename T>
inline void store_tile(T* p, vf v, int64_t width) {
    if (width == kLanes && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)) {
        if constexpr (std::is_same_v<T, float>) {
            std::memcpy(p, &v, sizeof(v));
        } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
            typedef uint32_t vu __attribute__((vector_size(kLanes * sizeof(uint32_t))));
            typedef uint16_t vh __attribute__((vector_size(kLanes * sizeof(uint16_t))));
            const vf r = round_as<T>(v);
            const vh top = __builtin_convertvector(reinterpret_cast<const vu&>(r) >> 16, vh);  // the bf16 is the top half
            std::memcpy(p, &top, sizeof(top));
        }
        return;
    }
    for (int64_t c = 0; c < width; c++) p[c] = static_cast<T>(v[c]);
}

}  // namespace mamba_cpu
