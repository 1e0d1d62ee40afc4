// y = x @ w^T for a few rows of x (1..64; the ops layer sends it 2..16 rows with small weights,
// 17..64 rows with narrow ones (x_proj's) or small ones (the 130m out_proj, and its in_proj with the
// conv step fused in), where it beats cuBLAS), on tensor cores, for 16-bit types.
//
// cuBLAS picks tilings made for large products, and at 8-64 rows spends 4-6 us on matrices that
// take 0.1-1 us to read (benchmarks/gemm_microbench.py); its kernels also cannot start early, so they
// break the chain of early-launched decode kernels. Here a tile of COLS output columns is computed by
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

// Staging by the copy engine (sm_90: cp.async.bulk): one bulk copy per row, issued by warp 0's
// lanes, its arrival counted in bytes on an mbarrier that every thread then waits on. Copies of 16
// bytes per thread (cp.async) kept a block's staging to ~20 GB/s per SM at 64 rows (a 64 x 768 x
// and 32 x 768 w took ~8 us): the loads a few warps can have in flight, not bandwidth, set the pace.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }
// Thread 0, before any copy: one arrival expected (its own, here) and `bytes` of copies.
__device__ __forceinline__ void bulk_expect(uint64_t* bar, unsigned bytes) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(smem_addr(bar)) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Warp 0: rows [0, rows) of `bytes` each (a multiple of 16) at g (row stride `stride` elements) to s
// (row stride ld elements), both 16-byte aligned.
template <typename T>
__device__ __forceinline__ void bulk_rows(T* s, int ld, const T* g, int64_t stride, int rows, unsigned bytes, uint64_t* bar) {
    if (threadIdx.x >= 32) return;
    for (int r = threadIdx.x; r < rows; r += 32)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(s + r * ld)),
                     "l"(g + r * stride), "r"(bytes), "r"(smem_addr(bar))
                     : "memory");
}
__device__ __forceinline__ void bulk_wait(uint64_t* bar) {
    asm volatile(
        "{\n\t.reg .pred done;\n\tWAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 done, [%0], 0;\n\t@!done bra WAIT;\n\t}" ::"r"(smem_addr(bar))
        : "memory");
}
// Zeros where bulk_rows does not write: rows [valid_rows, rows) and columns [valid_cols, cols) of
// the others (cols and valid_cols multiples of 16 bytes).
template <typename T>
__device__ __forceinline__ void zero_rest(T* s, int ld, int rows, int valid_rows, int cols, int valid_cols) {
    constexpr int V = 16 / sizeof(T);
    const int per_row = cols / V;
    for (int i = threadIdx.x; i < rows * per_row; i += kGemmThreads) {
        const int r = i / per_row, c = (i % per_row) * V;
        if (r >= valid_rows || c >= valid_cols) *reinterpret_cast<uint4*>(s + r * ld + c) = make_uint4(0, 0, 0, 0);
    }
}

// Grid (S, ceil(n / COLS)), clusters of (S, 1, 1); block rank r takes k in [r * slice, (r + 1) * slice)
// (slice a multiple of 64, k a multiple of 16 / sizeof(T)). MT: 16-row tiles of x (m <= 16 * MT).
// The 4 warps share out the block's COLS / 16 column tiles and MT row tiles: COLS 64, a warp per
// column tile over every row tile; COLS 16 (narrow weights such as x_proj's 80-192 rows, at 17-64
// rows of x), a warp per row tile, so that a narrow product spreads over 4x the clusters without
// computing padding; COLS 32, a warp per column tile over every other row tile.
// K > 0 (a decoded token's in_proj with its conv step, S = 1): columns [0, conv.dim) are x, whose
// channel c goes through the causal conv step in the epilogue (the conv is channel-local, and a
// block holds whole channels: conv.dim % COLS == 0); silu(conv) goes to conv.y and columns [dim, 2 dim),
// z, to y, both (m, dim); the conv state of the block's channels is staged with x.
// Shared memory (gemm_smem): x slice (16 MT, slice + pad), w slice (COLS, slice + pad) in T; the
// block's partial tile (16 MT, COLS) and the S partials of its share of the tile, float; with K > 0,
// the conv state of the tile's channels (16 MT, COLS K) in T.
template <typename T, int MT, int COLS, int K = 0>
__global__ void __launch_bounds__(kGemmThreads) rows_gemm_kernel(const T* x, const T* w, const T* bias, T* y, int m, int n, int k, int slice,
                                                                 ConvArgs conv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace wmma = nvcuda::wmma;
    namespace cg = cooperative_groups;
    static_assert(COLS == 16 || COLS == 32 || COLS == 64, "1, 2 or 4 column tiles of 16");
    constexpr int kColTiles = COLS / 16, kRowGroups = 4 / kColTiles;  // a warp's column tile: warp % kColTiles
    constexpr int kTiles = (MT + kRowGroups - 1) / kRowGroups;        // row tiles per warp, at most
    constexpr int kCells = 16 * MT * COLS;
    extern __shared__ __align__(128) unsigned char tile_smem[];
    const int ld = slice + kGemmPad;
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank()), splits = static_cast<int>(cluster.num_blocks());
    const int share = ((kCells + splits - 1) / splits + 3) / 4 * 4;  // cells of the tile summed by each block
    T* xs = reinterpret_cast<T*>(tile_smem);                        // (16 MT, ld)
    T* ws = xs + 16 * MT * ld;                                      // (COLS, ld)
    float* part = reinterpret_cast<float*>(ws + COLS * ld);         // (16 MT, COLS)
    float* shares = part + kCells;                                  // (S, share)
    T* states = reinterpret_cast<T*>(shares + splits * share);      // (16 MT, COLS K), K > 0
    const int col0 = blockIdx.y * COLS, k0 = rank * slice, warp = threadIdx.x / 32;
    const int tile0 = warp / kColTiles, wcol = (warp % kColTiles) * 16;  // the warp's first row tile and its column
    const bool conv_tile = K > 0 && col0 < conv.dim;
    const int valid_k = min(slice, k - k0), w_rows = min(COLS, n - col0);
    const unsigned row_bytes = valid_k * sizeof(T), state_bytes = COLS * K * sizeof(T);
    __shared__ uint64_t staged;  // the mbarrier of the bulk copies
    start_next_early();
    // The weights are constant: staged while the previous kernel may still run (with the conv taps
    // of this thread's cells: all in one column, as 128 % COLS == 0); x and the conv state after it ends.
    if (threadIdx.x == 0) bulk_expect(&staged, (w_rows + m) * row_bytes + (conv_tile ? m * state_bytes : 0));
    __syncwarp();
    bulk_rows(ws, ld, w + (int64_t)col0 * k + k0, k, w_rows, row_bytes, &staged);
    ConvChannel<T, (K > 0 ? K : 2)> chan;
    if (conv_tile) chan.load_taps(conv, col0 + threadIdx.x % COLS);
    zero_rest(ws, ld, COLS, w_rows, slice, valid_k);
    zero_rest(xs, ld, 16 * MT, m, slice, valid_k);
    wait_for_previous();
    bulk_rows(xs, ld, x + k0, k, m, row_bytes, &staged);
    if (conv_tile) bulk_rows(states, COLS * K, static_cast<const T*>(conv.state) + (int64_t)col0 * K, (int64_t)conv.dim * K, m, state_bytes, &staged);
    __syncthreads();  // the zeros
    bulk_wait(&staged);
    // kChains accumulators per 16-row tile, taking k-steps in turn: independent chains of mma, so
    // that one's latency does not hold up the next (a single chain was ~0.8 us of a 5 us product).
    constexpr int kChains = kTiles == 1 ? 4 : (kTiles == 2 ? 2 : 1);
    if (tile0 < MT) {
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
                    const int tile = tile0 + t * kRowGroups;
                    if (tile < MT) {
                        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                        wmma::load_matrix_sync(a, xs + tile * 16 * ld + kk + 16 * c, ld);
                        wmma::mma_sync(acc[t][c], a, b, acc[t][c]);
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < kTiles; t++) {
            const int tile = tile0 + t * kRowGroups;
            if (tile >= MT) break;
#pragma unroll
            for (int c = 1; c < kChains; c++)
#pragma unroll
                for (int e = 0; e < acc[t][0].num_elements; e++) acc[t][0].x[e] += acc[t][c].x[e];
            wmma::store_matrix_sync(part + tile * 16 * COLS + wcol, acc[t][0], COLS, wmma::mem_row_major);
        }
    }
    __syncthreads();
    // Block o owns cells [o * share, (o + 1) * share) of the tile: every block sends it its partial
    // of them (stores into the owner's shared memory, which do not wait, unlike remote loads).
    for (int i = threadIdx.x * 4; i < kCells; i += kGemmThreads * 4) {
        const int owner = i / share;  // share % 4 == 0: a float4 never straddles two owners
        *reinterpret_cast<float4*>(cluster.map_shared_rank(shares, owner) + rank * share + (i - owner * share)) =
            *reinterpret_cast<const float4*>(part + i);
    }
    cluster.sync();  // every partial has arrived
    for (int j = threadIdx.x; j < share && rank * share + j < kCells; j += kGemmThreads) {
        float sum = 0.0f;
        for (int s = 0; s < splits; s++) sum += shares[s * share + j];  // in rank order: deterministic
        const int cell = rank * share + j, row = cell / COLS, c = cell % COLS, col = col0 + c;
        if (row >= m || col >= n) continue;
        const float v = sum + (bias ? to_f(bias[col]) : 0.0f);
        if constexpr (K > 0) {
            if (conv_tile) {  // x_c rounded to T first, as the unfused path stores it
                chan.load_state(states + (row * COLS + c) * K);
                const float u = chan.step(static_cast<T*>(conv.state) + ((int64_t)row * conv.dim + col) * K, to_f(from_f<T>(v)));
                static_cast<T*>(conv.y)[(int64_t)row * conv.dim + col] = from_f<T>(u);
            } else {
                y[(int64_t)row * conv.dim + col - conv.dim] = from_f<T>(v);
            }
        } else {
            y[(int64_t)row * n + col] = from_f<T>(v);
        }
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
// Its dynamic shared memory in bytes (cols: COLS; conv_k: K).
inline size_t gemm_smem(int mt, int cols, GemmSplit split, size_t elem, int conv_k = 0) {
    const int cells = 16 * mt * cols, share = ((cells + split.splits - 1) / split.splits + 3) / 4 * 4;
    return (16 * mt + cols) * (split.slice + kGemmPad) * elem + (cells + split.splits * share) * sizeof(float) + cells * conv_k * elem;
}

}  // namespace mamba
