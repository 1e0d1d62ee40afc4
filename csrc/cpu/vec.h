// 16-float vectors for the CPU kernels (GCC/Clang vector extensions) and the exp they share.
#pragma once
#include <cstdint>

namespace mamba_cpu {

constexpr int64_t kLanes = 16;

// 16 floats as one value: GCC/Clang vector extensions compile this to one AVX-512 or two AVX2
// instructions per operation, with no reliance on the auto-vectoriser.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for 16 lanes: Cephes expf's range reduction and polynomial (about 1 ulp).
inline vf vexp(vf x) {
    const vf lo = vf{} - 87.3f, hi = vf{} + 88.3f, magic = vf{} + 12582912.0f;  // 1.5 * 2^23 rounds to nearest
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    const vf n = (x * 1.44269504088896341f + magic) - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, two-part constant
    vf p = vf{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
    return p * reinterpret_cast<const vf&>(bits);
}

template <typename T>
inline vf load_tile(const T* p, int64_t width) {
    vf v = {};
    for (int64_t c = 0; c < width; c++) v[c] = static_cast<float>(p[c]);
    return v;
}

}  // namespace mamba_cpu
