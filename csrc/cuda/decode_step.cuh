// The decode step of a layer's SSM after the conv: dt_proj, softplus, the state update and the
// gated output of one token for a batch, in one kernel launched early (no torch here).
#pragma once
#include "fused_kernels.cuh"

namespace mamba {

struct StepArgs {
    const void *u, *dt_low, *dt_weight, *B, *C, *z;
    const float *A, *D;
    const void* delta_bias;  // (d,) in the inputs' dtype
    void* state;  // (b, d, n) in the kernel's state type: float32, or the inputs' dtype
    void* y;
    int64_t u_sb, dl_sb, b_sb, c_sb, z_sb, w_s0;
    int dim, rank;
    int dt_pieces;  // kDtPiece-element pieces of dt's dot product per lane (<= the kernel's P), or 0
    bool vec;       // the state's and B's and C's rows aligned to a lane's states: vector loads
    Ahead ahead;    // pulled into L2 before the wait
};

// dt's dot product over the rank in pieces of kDtPiece consecutive elements (8 bytes of a 16-bit
// type, 16 of float32): at one batch row per thread, a lane takes rank / (kDtPiece * L) consecutive
// pieces (at most the kernel's P: 4, or kMaxDtPieces for ranks up to 160 at 4 lanes, every published size) of
// dt_weight[c], loaded before the wait for the previous kernel, and of its row of dt_low, so that all
// of its loads are in flight at once: one round trip to L2 instead of two (rank 48) to five (160).
constexpr int kDtPiece = 4;
constexpr int kMaxDtPieces = 10;
template <typename T>
using DtPiece = typename Pieces<kDtPiece, T>::Type;  // 8 bytes (16-bit types) or 16 (float32)

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
// (dt in up to 4 pieces or element by element), 72 (10 pieces). ST: the state's type, float32 or T
// (a cache that keeps the state in the model dtype: half the bytes, rounded once per token).
constexpr int kStepRowBlocks = 4096;
constexpr int step_min_blocks(int n, int rows) { return rows > 1 ? (n > 16 ? 3 : 5) : 0; }
template <typename T, typename ST, int N, int L, int R, int P>
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
    // The state's row into L2 (6.3 MB per layer, from DRAM, at batch 64 of the 130m: -1.5% per token on an
    // H200). Not with 4 rows per thread: 1.4b and 2.8b at batch 64 took 0.7-1.4% longer with it.
    ST* state = static_cast<ST*>(a.state);
    if (R == 1) prefetch_line(state + ((int64_t)min(b0, batch - 1) * a.dim + c) * N + lane * S);
    prefetch_ahead(a.ahead);
    wait_for_previous();
    int rows[R];  // batch rows, the last repeated past the batch's end (computed, not stored)
    float h[R][S], Bv[R][S], Cv[R][S], u[R], zv[R], acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int b = rows[r] = min(b0 + r, batch - 1);
        load_vec(state + ((int64_t)b * a.dim + c) * N + lane * S, a.vec, h[r]);
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
                acc[0] = dot_piece<T>(dv, wp[i], acc[0]);
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
        if (stored) store_vec(state + ((int64_t)rows[r] * a.dim + c) * N + lane * S, a.vec, h[r]);
#pragma unroll
        for (int off = L / 2; off > 0; off /= 2) p += __shfl_xor_sync(0xffffffff, p, off, L);
        if (stored && lane == 0) {
            const float gate = a.z ? silu(zv[r]) : 1.0f;
            static_cast<T*>(a.y)[(int64_t)rows[r] * a.dim + c] = from_f<T>((p + Dc * u[r]) * gate);
        }
    }
}

}  // namespace mamba
