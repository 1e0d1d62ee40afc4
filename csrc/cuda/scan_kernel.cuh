// The prompt's selective scan (scan.cu launches it): y = C . h + D u, gated by silu(z), with
// h_t = exp(dt A) h_{t-1} + dt u_t B_t per (channel, state), dt = softplus(delta + bias).
//
// Shape of the work: a block is kChannels channels of one sequence; kSplit adjacent lanes share a
// channel, each holding MAXN of its states in registers. Per chunk of kChunk steps the block stages
// B, C, (dt, dt u), D u and silu(z) in shared memory from loads issued during the previous chunk's
// arithmetic; then each lane walks the steps, and every kSplit steps the lanes of a channel
// reduce-scatter their partial outputs, so that each lane finishes one step's sum: into a tile of
// outputs that the block writes as 16-byte vectors after the chunk (VEC), or straight to y.
#pragma once
#include "mamba_kernels.cuh"

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
#ifndef MAMBA_SCAN_VEC
#define MAMBA_SCAN_VEC 1
#endif
#ifndef MAMBA_SCAN_PIPE
#define MAMBA_SCAN_PIPE 1
#endif
constexpr int kSplit = MAMBA_SCAN_SPLIT;  // adjacent lanes per channel, each holding n / kSplit of its states
constexpr int kThreads = MAMBA_SCAN_THREADS;  // threads per block
constexpr int kChannels = kThreads / kSplit;  // channels per block
constexpr int kChunk = MAMBA_SCAN_CHUNK;  // time steps staged in shared memory at once
constexpr int kMinBlocks = MAMBA_SCAN_BLOCKS;  // blocks per SM the registers must allow
constexpr bool kScanVec = MAMBA_SCAN_VEC;  // 16-byte tile loads where the host finds them aligned
constexpr bool kScanPipe = MAMBA_SCAN_PIPE;  // a group's reduce-scatter overlapped with the next group's steps
static_assert((kSplit & (kSplit - 1)) == 0 && kSplit <= 32 && kChunk % kSplit == 0, "kSplit: a power of two dividing kChunk");

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

// Element loads of a (kChunk, cols) tile (any shape), cols a power of two <= kThreads: thread i holds
// column i % cols of rows i / cols + k * kThreads / cols.
constexpr int tile_loads(int cols) { return kChunk * cols >= kThreads ? kChunk * cols / kThreads : 1; }

// This thread's K values of the tile of rows t0... of p (row stride sl): column `col`, 0 past `length`
// or where !col_ok. FULL: no row guards.
template <int COLS, int K, bool FULL, typename T>
__device__ __forceinline__ void load_tile(const T* p, int64_t sl, int t0, int length, int col, bool col_ok, float* v) {
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

// ---- A chunk's tiles: who loads, stages and writes what ----

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector

// A thread's part of a (ROWS, COLS) tile in groups of W consecutive columns (W = kVec<T> with vector
// loads, 1 with element loads): thread i takes groups i, i + kThreads, ... in row-major order. The
// same thread loads a group, stages it and (for the u tile) writes its outputs.
template <int ROWS, int COLS, int W>
struct TileGroups {
    static_assert(COLS % W == 0, "whole groups per row");
    static constexpr int kPerRow = COLS / W;
    static constexpr int kCount = ROWS * kPerRow;
    static constexpr int kPerThread = (kCount + kThreads - 1) / kThreads;
    __device__ static int row(int k) { return (static_cast<int>(threadIdx.x) + k * kThreads) / kPerRow; }
    __device__ static int col(int k) { return (static_cast<int>(threadIdx.x) + k * kThreads) % kPerRow * W; }
    __device__ static bool valid(int k) { return kCount % kThreads == 0 || static_cast<int>(threadIdx.x) + k * kThreads < kCount; }
};

// One group in flight: a 16-byte vector (VEC), or one element already widened to float.
__device__ __forceinline__ uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
template <typename T, int W, typename Slot>
__device__ __forceinline__ void group_values(const Slot& s, float (&v)[W]) {
    if constexpr (std::is_same<Slot, uint4>::value) load_vec(reinterpret_cast<const T*>(&s), true, v);
    else v[0] = s;
}

// The kernel. MAXN: states per lane (n / kSplit rounded up, a compile-time constant so the state lives
// in registers; missing states are padded with A = 0, B = C = 0 and stay 0, so the inner loop has no
// branches; padded steps have dt = 0 and leave the state unchanged). VEC: the tiles' rows are whole
// 16-byte vectors (n = kSplit * MAXN, rows and d aligned: the host checks), loaded one per group.
template <typename T, int MAXN, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scan_kernel(ScanArgs a) {
    constexpr int kWidth = kSplit * MAXN;  // padded state size
    constexpr int W = VEC ? kVec<T> : 1;
    using Slot = typename std::conditional<VEC, uint4, float>::type;
    using UTile = TileGroups<kChunk, kChannels, W>;   // u, delta, z, and the outputs: (kChunk, kChannels)
    using BCTile = TileGroups<2 * kChunk, kWidth, W>;  // B's rows, then C's: (kChunk, kWidth) each
    __shared__ __align__(16) float sB[kChunk][kWidth];
    __shared__ __align__(16) float sC[kChunk][kWidth];
    __shared__ __align__(16) float2 sDtU[kChunk][kChannels];  // (dt, dt * u)
    __shared__ __align__(16) float sDu[kChunk][kChannels];    // D * u
    __shared__ __align__(16) float sZ[kChunk][kChannels];     // silu(z), or 1
    __shared__ __align__(16) float sY[kChunk][kChannels + 8];  // C . h; padded: a group's 4 steps x 8 channels hit 32 banks
    __shared__ __align__(16) float sBias[kChannels], sD[kChannels];  // (VEC) each channel's dt bias and D
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
    // Each channel's dt bias and D, loaded once: a vector group's W channels from shared memory (read
    // after the first barrier), an element's one channel from registers.
    const int cg = min(c0 + static_cast<int>(threadIdx.x) % kChannels, a.dim - 1);  // (element loads) this thread's channel
    float bias_c = 0.0f, D_c = 0.0f;
    if (VEC ? threadIdx.x < kChannels : true) {
        const int ch = VEC ? c0 + threadIdx.x : cg;
        const bool ok = ch < a.dim;
        bias_c = a.delta_bias && ok ? to_f(static_cast<const T*>(a.delta_bias)[ch]) : 0.0f;
        D_c = a.D && ok ? a.D[ch] : 0.0f;
        if (VEC) {
            sBias[threadIdx.x] = bias_c;
            sD[threadIdx.x] = D_c;
        }
    }
    const T* u = static_cast<const T*>(a.u) + b * a.u_sb;
    const T* delta = static_cast<const T*>(a.delta) + b * a.d_sb;
    const T* Bp = static_cast<const T*>(a.B) + b * a.b_sb;
    const T* Cp = static_cast<const T*>(a.C) + b * a.c_sb;
    const T* z = a.z ? static_cast<const T*>(a.z) + b * a.z_sb : nullptr;
    T* y = static_cast<T*>(a.y) + (int64_t)b * a.length * a.dim;

    // The next chunk, in flight during this one's arithmetic (zero past the sequence and the channels).
    // FULL: the whole chunk lies before the end (no row guards: they were most of the loads' instructions).
    Slot rbc[BCTile::kPerThread], ru[UTile::kPerThread], rd[UTile::kPerThread], rz[UTile::kPerThread];
    auto load_as = [&](auto full, int t0) {
        constexpr bool kFull = decltype(full)::value;
        if constexpr (VEC) {
#pragma unroll
            for (int k = 0; k < UTile::kPerThread; k++) {
                const int64_t t = t0 + UTile::row(k);
                const int ch = c0 + UTile::col(k);
                const bool ok = UTile::valid(k) && (kFull || t < a.length) && ch < a.dim;
                ru[k] = ok ? load16(u + t * a.u_sl + ch) : uint4{};
                rd[k] = ok ? load16(delta + t * a.d_sl + ch) : uint4{};
                rz[k] = ok && z ? load16(z + t * a.z_sl + ch) : uint4{};
            }
#pragma unroll
            for (int k = 0; k < BCTile::kPerThread; k++) {
                const int r = BCTile::row(k), n = BCTile::col(k);
                const int64_t t = t0 + r % kChunk;
                const bool ok = BCTile::valid(k) && (kFull || t < a.length);
                rbc[k] = ok ? load16(r < kChunk ? Bp + t * a.b_sl + n : Cp + t * a.c_sl + n) : uint4{};
            }
        } else {  // the same groups (TileGroups with W = 1), with load_tile's pointer arithmetic
            constexpr int K = BCTile::kPerThread / 2;
            static_assert(K == tile_loads(kWidth) && UTile::kPerThread == tile_loads(kChannels), "load_tile's mapping");
            const int n_col = threadIdx.x % kWidth;
            load_tile<kWidth, K, kFull>(Bp, a.b_sl, t0, a.length, n_col, n_col < a.nstate, rbc);
            load_tile<kWidth, K, kFull>(Cp, a.c_sl, t0, a.length, n_col, n_col < a.nstate, rbc + K);
            load_tile<kChannels, UTile::kPerThread, kFull>(u, a.u_sl, t0, a.length, cg, true, ru);
            load_tile<kChannels, UTile::kPerThread, kFull>(delta, a.d_sl, t0, a.length, cg, true, rd);
            if (z) load_tile<kChannels, UTile::kPerThread, kFull>(z, a.z_sl, t0, a.length, cg, true, rz);
        }
    };
    auto load = [&](int t0) {
        if (t0 + kChunk <= a.length) load_as(std::true_type{}, t0);
        else load_as(std::false_type{}, t0);
    };
    // Stage the chunk: B and C as they are; per (step, channel) dt, dt u, D u and silu(z).
    auto stage = [&](int t0) {
#pragma unroll
        for (int k = 0; k < BCTile::kPerThread; k++) {
            if (!BCTile::valid(k)) continue;
            const int r = BCTile::row(k);
            float v[W];
            group_values<T>(rbc[k], v);
            store_vec(&(r < kChunk ? sB : sC)[r % kChunk][BCTile::col(k)], true, v);
        }
#pragma unroll
        for (int k = 0; k < UTile::kPerThread; k++) {
            const int t = UTile::row(k), cl = UTile::col(k);
            float uv[W], dv[W], zv[W], bias[W], D[W], dtu[2 * W], du[W], gate[W];
            group_values<T>(ru[k], uv);
            group_values<T>(rd[k], dv);
            group_values<T>(rz[k], zv);
            if constexpr (VEC) {
                load_vec(&sBias[cl], true, bias);
                load_vec(&sD[cl], true, D);
            } else {
                bias[0] = bias_c;
                D[0] = D_c;
            }
            const float valid = t0 + t < a.length ? 1.0f : 0.0f;  // a select, not a branch
#pragma unroll
            for (int j = 0; j < W; j++) {
                const float dt = softplus_for<T>(dv[j] + bias[j]) * valid;
                dtu[2 * j] = dt;
                dtu[2 * j + 1] = dt * uv[j];
                du[j] = D[j] * uv[j];
                gate[j] = z ? silu_for<T>(zv[j]) : 1.0f;
            }
            store_vec(&sDtU[t][cl].x, true, dtu);
            store_vec(&sDu[t][cl], true, du);
            store_vec(&sZ[t][cl], true, gate);
        }
    };
    // The chunk's outputs (after a barrier: sY is complete), by the threads that staged them.
    auto write_out = [&](int t0) {
        if constexpr (VEC) {
#pragma unroll
            for (int k = 0; k < UTile::kPerThread; k++) {
                const int t = UTile::row(k), cl = UTile::col(k);
                if (!UTile::valid(k) || t0 + t >= a.length || c0 + cl >= a.dim) continue;
                float sum[W], du[W], gate[W];
                load_vec(&sY[t][cl], true, sum);
                load_vec(&sDu[t][cl], true, du);
                load_vec(&sZ[t][cl], true, gate);
#pragma unroll
                for (int j = 0; j < W; j++) sum[j] = (sum[j] + du[j]) * gate[j];
                store_vec(y + (int64_t)(t0 + t) * a.dim + c0 + cl, true, sum);
            }
        }
    };
    // One group of kSplit steps from g: this lane's partial outputs (its MAXN states) per step.
    auto steps_of = [&](int g, float (&acc)[kSplit]) {
#pragma unroll
        for (int s = 0; s < kSplit; s++) {
            const float2 du = sDtU[g + s][local];
            float Bv[MAXN], Cv[MAXN];
            load_vec(&sB[g + s][n0], true, Bv);
            load_vec(&sC[g + s][n0], true, Cv);
            float part_sum[2] = {0.0f, 0.0f};  // two chains: half the dependent FMAs per step
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
                const float decay = exp2_for<T>(du.x * A2[i]);
                h[i] = fmaf(decay, h[i], du.y * Bv[i]);
                part_sum[i % 2] = fmaf(h[i], Cv[i], part_sum[i % 2]);
            }
            acc[s] = part_sum[0] + part_sum[1];
        }
    };
    // The group's sums over the channel's lanes: lane `part` holds step g + part's; into sY (written out
    // by write_out as vectors), or with element loads straight to y (no registers are left for
    // write_out's loads beside the next chunk's 32 values in flight: it spilled).
    auto emit = [&](int t0, int g, int steps, float (&acc)[kSplit]) {
        const float sum = reduce_scatter(acc, part);
        const int t = g + part;
        if constexpr (VEC) sY[t][local] = sum;
        else if (active && t < steps) y[(int64_t)(t0 + t) * a.dim + c] = from_f<T>((sum + sDu[t][local]) * sZ[t][local]);
    };

    load(0);
    int t0 = 0;
    for (; t0 < a.length; t0 += kChunk) {
        __syncthreads();  // the previous chunk's steps are done
        if (t0 > 0) write_out(t0 - kChunk);
        stage(t0);
        __syncthreads();
        if (t0 + kChunk < a.length) load(t0 + kChunk);
        const int steps = min(kChunk, a.length - t0);
        if constexpr (kScanPipe && VEC) {  // group g's shuffles interleave with group g + 1's updates (element
            // loads hold 32 values in flight: no registers left for it)
            float prev[kSplit];
            steps_of(0, prev);
            int g = kSplit;
            for (; g < steps; g += kSplit) {
                float acc[kSplit];
                steps_of(g, acc);
                emit(t0, g - kSplit, steps, prev);
#pragma unroll
                for (int s = 0; s < kSplit; s++) prev[s] = acc[s];
            }
            emit(t0, g - kSplit, steps, prev);
        } else {
            for (int g = 0; g < steps; g += kSplit) {
                float acc[kSplit];
                steps_of(g, acc);
                emit(t0, g, steps, acc);
            }
        }
    }
    __syncthreads();
    if (t0 > 0) write_out(t0 - kChunk);  // the last chunk's outputs (none for an empty sequence)
    if (active) {
#pragma unroll
        for (int i = 0; i < MAXN; i++)
            if (n0 + i < a.nstate) a.state[((int64_t)b * a.dim + c) * a.nstate + n0 + i] = h[i];
    }
}

}  // namespace mamba
