// y = x @ w^T for a few rows of x (1..64; the ops layer sends it 2..16 rows with small weights and
// 17..64 rows with narrow ones, x_proj's, where it beats cuBLAS), on tensor cores, for 16-bit types.
//
// cuBLAS picks tilings made for large products, and at 8-16 rows spends 4-6 us on matrices that
// take 0.1-1 us to read (benchmarks/gemm_microbench.py); its kernels also cannot start early, so they
// break the chain of early-launched decode kernels. Here a tile of 64 output columns is computed by
// a cluster of S blocks (sm_90+), each over one slice of k (so the x rows are read once per tile,
// not once per 16 columns, and a 768x3072 product still spreads over 192 blocks); the S partial
// tiles are summed in a fixed order through distributed shared memory, so the result does not
// depend on timing. Float32 accumulation (wmma 16x16x16), rounded once to T.
#pragma once
#include <cooperative_groups.h>
#include <mma.h>

#include "fused_kernels.cuh"

namespace mamba {

constexpr int kGemmThreads = 128;   // 4 warps
constexpr int kGemmMaxSplit = 8;    // blocks per cluster at most (the portable cluster size)
constexpr int kGemmSliceMin = 192;  // k per block at least, where k allows (measured on an H200: 4 blocks for k = 768)
constexpr int kGemmPad = 8;         // elements after each staged row: rows 16 bytes apart mod 128

// 16 bytes from global to shared memory without passing through registers; zeros when !valid.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_async_wait_all() { asm volatile("cp.async.commit_group;\ncp.async.wait_all;" ::: "memory"); }

// Stages rows [0, rows) x columns [k0, k0 + slice) of a (?, k) row-major matrix into s (row stride
// slice + kGemmPad); rows >= valid_rows and columns >= k are zeros.
template <typename T>
__device__ __forceinline__ void stage_rows(T* s, const T* g, int rows, int valid_rows, int k, int k0, int slice) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = slice / V;
    for (int i = threadIdx.x; i < rows * per_row; i += kGemmThreads) {
        const int r = i / per_row, c = k0 + (i % per_row) * V;
        const bool valid = r < valid_rows && c < k;
        copy16_async(s + r * (slice + kGemmPad) + (c - k0), valid ? g + (int64_t)r * k + c : g, valid);
    }
}

// Grid (S, ceil(n / COLS)), clusters of (S, 1, 1); block rank r takes k in [r * slice, (r + 1) * slice)
// (slice a multiple of 64, k a multiple of 16 / sizeof(T)). MT: 16-row tiles of x (m <= 16 * MT).
// COLS 64: each of the 4 warps takes 16 columns and every row tile; COLS 16 (narrow weights such as
// x_proj's 80-192 rows, at 17-64 rows of x): each warp takes one row tile of the block's 16 columns,
// so that a narrow product spreads over 4x the clusters without computing padding.
// Shared memory (gemm_smem): x slice (16 MT, slice + pad), w slice (COLS, slice + pad) in T; the
// block's partial tile (16 MT, COLS) and the S partials of its share of the tile, float.
template <typename T, int MT, int COLS>
__global__ void __launch_bounds__(kGemmThreads) rows_gemm_kernel(const T* x, const T* w, const T* bias, T* y, int m, int n, int k, int slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace wmma = nvcuda::wmma;
    namespace cg = cooperative_groups;
    static_assert(COLS == 64 || (COLS == 16 && MT <= 4), "warps over 4 column tiles, or over at most 4 row tiles");
    constexpr bool kWarpRows = COLS == 16;     // a warp per row tile (else per 16 columns)
    constexpr int kTiles = kWarpRows ? 1 : MT;  // row tiles per warp
    constexpr int kCells = 16 * MT * COLS;
    extern __shared__ __align__(128) unsigned char tile_smem[];
    const int ld = slice + kGemmPad;
    T* xs = reinterpret_cast<T*>(tile_smem);                       // (16 MT, ld)
    T* ws = xs + 16 * MT * ld;                                     // (COLS, ld)
    float* part = reinterpret_cast<float*>(ws + COLS * ld);        // (16 MT, COLS)
    float* shares = part + kCells;                                 // (S, share)
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank()), splits = static_cast<int>(cluster.num_blocks());
    const int col0 = blockIdx.y * COLS, k0 = rank * slice, warp = threadIdx.x / 32;
    const int tile0 = kWarpRows ? warp : 0, wcol = kWarpRows ? 0 : warp * 16;  // the warp's first row tile and column
    start_next_early();
    // The weights are constant: staged while the previous kernel may still run; x after it ends.
    stage_rows(ws, w + (int64_t)col0 * k, COLS, n - col0, k, k0, slice);
    wait_for_previous();
    stage_rows(xs, x, 16 * MT, m, k, k0, slice);
    copy_async_wait_all();
    __syncthreads();
    // kChains accumulators per 16-row tile, taking k-steps in turn: independent chains of mma, so
    // that one's latency does not hold up the next (a single chain was ~0.8 us of a 5 us product).
    constexpr int kChains = kTiles == 1 ? 4 : (kTiles == 2 ? 2 : 1);
    if (!kWarpRows || warp < MT) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTiles][kChains];
#pragma unroll
        for (int t = 0; t < kTiles; t++)
#pragma unroll
            for (int c = 0; c < kChains; c++) wmma::fill_fragment(acc[t][c], 0.0f);
        for (int kk = 0; kk < slice; kk += 16 * kChains) {  // slice % 64 == 0
#pragma unroll
            for (int c = 0; c < kChains; c++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // w rows as columns of w^T
                wmma::load_matrix_sync(b, ws + wcol * ld + kk + 16 * c, ld);
#pragma unroll
                for (int t = 0; t < kTiles; t++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                    wmma::load_matrix_sync(a, xs + (tile0 + t) * 16 * ld + kk + 16 * c, ld);
                    wmma::mma_sync(acc[t][c], a, b, acc[t][c]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < kTiles; t++) {
#pragma unroll
            for (int c = 1; c < kChains; c++)
#pragma unroll
                for (int e = 0; e < acc[t][0].num_elements; e++) acc[t][0].x[e] += acc[t][c].x[e];
            wmma::store_matrix_sync(part + (tile0 + t) * 16 * COLS + wcol, acc[t][0], COLS, wmma::mem_row_major);
        }
    }
    __syncthreads();
    // Block o owns cells [o * share, (o + 1) * share) of the tile: every block sends it its partial
    // of them (stores into the owner's shared memory, which do not wait, unlike remote loads).
    const int share = ((kCells + splits - 1) / splits + 3) / 4 * 4;
    for (int i = threadIdx.x * 4; i < kCells; i += kGemmThreads * 4) {
        const int owner = i / share;  // share % 4 == 0: a float4 never straddles two owners
        *reinterpret_cast<float4*>(cluster.map_shared_rank(shares, owner) + rank * share + (i - owner * share)) =
            *reinterpret_cast<const float4*>(part + i);
    }
    cluster.sync();  // every partial has arrived
    for (int j = threadIdx.x; j < share && rank * share + j < kCells; j += kGemmThreads) {
        float sum = 0.0f;
        for (int s = 0; s < splits; s++) sum += shares[s * share + j];  // in rank order: deterministic
        const int cell = rank * share + j, row = cell / COLS, col = col0 + cell % COLS;
        if (row < m && col < n) y[(int64_t)row * n + col] = from_f<T>(sum + (bias ? to_f(bias[col]) : 0.0f));
    }
#else
    __trap();  // launched on sm_90+ only (rows_gemm in gemm.cu checks)
#endif
}

// How rows_gemm_kernel splits k: blocks per cluster and k per block (a multiple of 64). `splits` 0:
// one block per kGemmSliceMin of k, at most kGemmMaxSplit.
struct GemmSplit {
    int splits, slice;
};
inline GemmSplit gemm_split(int k, int splits) {
    if (splits <= 0) splits = (k + kGemmSliceMin - 1) / kGemmSliceMin;
    splits = splits < 1 ? 1 : (splits > kGemmMaxSplit ? kGemmMaxSplit : splits);
    const int per = (k + splits - 1) / splits, slice = (per + 63) / 64 * 64;
    return {(k + slice - 1) / slice, slice};  // no block left with nothing but padding
}
// Its dynamic shared memory in bytes (cols: COLS).
inline size_t gemm_smem(int mt, int cols, GemmSplit split, size_t elem) {
    const int cells = 16 * mt * cols, share = ((cells + split.splits - 1) / split.splits + 3) / 4 * 4;
    return (16 * mt + cols) * (split.slice + kGemmPad) * elem + (cells + split.splits * share) * sizeof(float);
}

}  // namespace mamba
