// y = x @ w^T for up to 64 rows of 16-bit x (decoding a batch of 17..64 rows: the 130m in_proj and
// out_proj), with mma.sync on ldmatrix fragments, for sm_90+.
//
// rows_gemm.cuh's wmma kernel loses to cuBLAS at 64 rows (~9 us against 3.6 for the 130m in_proj):
// ncu counted ~5,300 instructions per warp at ~4 cycles each with one warp per scheduler, its
// fragments read by ~48 scalar shared-memory loads per 8 tensor-core instructions and its staging
// paying an integer division per 16-byte piece. Here a block of 8 warps computes a (64, 64) tile of
// y over one slice of k: each warp a (32, 16) piece, per 16 of k three ldmatrix.x4 and four
// m16n8k16 mma; the slice of w is staged before the wait for the previous kernel (it is constant),
// x's after it in two halves, the first computed while the second arrives. As in rows_gemm, k may
// be split over a cluster of S blocks whose partials are summed in rank order through distributed
// shared memory (deterministic), each block finishing 64 / S rows of the tile.
#pragma once
#include <cooperative_groups.h>

#include "rows_gemm.cuh"

namespace mamba {

constexpr int kTileThreads = 256;            // 8 warps: 2 over rows (32 each) x 4 over columns (16 each)
constexpr int kTileRows = 64, kTileCols = 64;
constexpr int kTileMaxSlice = 832;           // of k per block: the x and w slices fit 227 KB of shared memory

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
}
// d += a b for a (16, 16) tile of x (row-major) and a (16, 8) tile of w^T (w's rows), float32 d.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Copies (cp.async, one commit group) rows [0, kTileRows) x columns [c0, c1) of a matrix at g (row
// stride `stride`; rows >= valid_rows and columns >= valid_cols as zeros) into s (row stride ld):
// warp i takes rows i, i + 8, ..., its lanes 16-byte pieces of a row (no division per piece).
template <typename T>
__device__ __forceinline__ void stage_tile(T* s, int ld, const T* g, int64_t stride, int valid_rows, int c0, int c1, int valid_cols) {
    constexpr int V = 16 / sizeof(T);
    for (int r = threadIdx.x / 32; r < kTileRows; r += kTileThreads / 32)
        for (int c = c0 + (threadIdx.x % 32) * V; c < c1; c += 32 * V) {
            const bool valid = r < valid_rows && c < valid_cols;
            copy16_async(s + r * ld + c, valid ? g + r * stride + c : g, valid);
        }
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Grid (S, ceil(n / 64)), clusters of (S, 1, 1); block rank r takes k in [r * slice, (r + 1) * slice)
// (slice a multiple of 64, k a multiple of 8). Shared memory (tile_smem_bytes): x and w slices
// (64, slice + pad) in T, and the S partials of the block's rows of the tile, float.
// K > 0: a decoded token's in_proj with its conv step (K taps): y's columns [0, conv.dim) are x,
// whose channel c goes through the causal conv step (the conv is channel-local; conv.dim % 64 == 0,
// so a tile is all x or all z): silu(conv) to conv.y (m, dim), the state updated; columns [dim, 2 dim)
// are z, to y (m, dim). The tile is then finished through the partials' path even for S = 1, so that
// each thread's cells lie in one column (its channel's taps loaded before the wait) and its cells'
// conv states are loaded right after the wait, in flight with x.
template <typename T, int K = 0>
__global__ void __launch_bounds__(kTileThreads) tile_gemm_kernel(const T* x, const T* w, const T* bias, T* y, int m, int n, int k, int slice,
                                                                 ConvArgs conv) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    extern __shared__ __align__(128) unsigned char tile_smem[];
    const int ld = slice + kGemmPad;  // rows 16 bytes apart mod 128: ldmatrix's 8 rows hit distinct banks
    T* xs = reinterpret_cast<T*>(tile_smem);                          // (64, ld)
    T* ws = xs + kTileRows * ld;                                      // (64, ld)
    float* shares = reinterpret_cast<float*>(ws + kTileCols * ld);    // (S, per, 64)
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank()), splits = static_cast<int>(cluster.num_blocks());
    const int col0 = blockIdx.y * kTileCols, k0 = rank * slice, valid_k = min(slice, k - k0), half = slice / 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp / 4, wn = warp % 4;
    const int per = (kTileRows + splits - 1) / splits;  // rows of the tile that each block finishes
    constexpr int kMaxCells = kTileRows * kTileCols / kTileThreads;  // a thread's cells of them, at most (S = 1)
    const bool conv_tile = K > 0 && col0 < conv.dim;
    const int c = col0 + threadIdx.x % kTileCols;  // with K > 0, the column of all of this thread's cells
    start_next_early();
    ConvChannel<T, (K > 0 ? K : 2)> chan;
    if (conv_tile) chan.load_taps(conv, c);
    stage_tile(ws, ld, w + (int64_t)col0 * k + k0, k, n - col0, 0, slice, valid_k);
    wait_for_previous();
    stage_tile(xs, ld, x + k0, k, m, 0, half, valid_k);
    stage_tile(xs, ld, x + k0, k, m, half, slice, valid_k);
    T held[kMaxCells][K > 0 ? K : 1];  // the conv states of this thread's cells: row rank * per + threadIdx.x / 64 + 4 j
    if (conv_tile) {
#pragma unroll
        for (int j = 0; j < kMaxCells; j++) {
            const int row = rank * per + threadIdx.x / kTileCols + 4 * j;
            if (threadIdx.x / kTileCols + 4 * j < per && row < m) {
                const T* st = static_cast<const T*>(conv.state) + ((int64_t)row * conv.dim + c) * K;
#pragma unroll
                for (int t = 0; t < K; t++) held[j][t] = st[t];
            }
        }
    }
    // ldmatrix row addresses of this lane: x rows wm * 32 + lane % 16 (+ 16), k + 8 for lanes 16-31
    // (a's four 8x8 pieces); w rows wn * 16 + lane % 8 (+ 8 for lanes 16-31), k + 8 for lanes 8-15
    // and 24-31 (b0, b1 of two 8-column tiles).
    const T* a_row = xs + (wm * 32 + lane % 16) * ld + (lane / 16) * 8;
    const T* b_row = ws + (wn * 16 + (lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8;
    float acc[2][2][4] = {};  // [row tile][column tile][fragment]
    auto steps = [&](int kb, int ke) {
#pragma unroll 4
        for (int kk = kb; kk < ke; kk += 16) {
            unsigned a0[4], a1[4], b[4];
            ldmatrix_x4(a0, a_row + kk);
            ldmatrix_x4(a1, a_row + 16 * ld + kk);
            ldmatrix_x4(b, b_row + kk);
            mma_16816<T>(acc[0][0], a0, b[0], b[1]);
            mma_16816<T>(acc[0][1], a0, b[2], b[3]);
            mma_16816<T>(acc[1][0], a1, b[0], b[1]);
            mma_16816<T>(acc[1][1], a1, b[2], b[3]);
        }
    };
    asm volatile("cp.async.wait_group 1;" ::: "memory");  // w and x's first half
    __syncthreads();
    steps(0, half);
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    steps(half, slice);
    // acc[t][j][e] is y's (row, col): row wm * 32 + t * 16 + lane / 4 (+ 8 for e >= 2), col wn * 16 + j * 8
    // + 2 (lane % 4) + e % 2.
    if (K == 0 && splits == 1) {
#pragma unroll
        for (int t = 0; t < 2; t++)
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int row = wm * 32 + t * 16 + lane / 4 + (e / 2) * 8, col = col0 + wn * 16 + j * 8 + 2 * (lane % 4) + e % 2;
                    if (row < m && col < n) y[(int64_t)row * n + col] = from_f<T>(acc[t][j][e] + (bias ? to_f(bias[col]) : 0.0f));
                }
        return;
    }
    // Block o finishes rows [o * per, (o + 1) * per) of the tile: every block stores its partial of
    // them into o's shared memory (remote stores do not wait), then o sums the S partials in rank order.
#pragma unroll
    for (int t = 0; t < 2; t++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = wm * 32 + t * 16 + lane / 4 + h * 8, col = wn * 16 + j * 8 + 2 * (lane % 4);
                const int owner = row / per;
                *reinterpret_cast<float2*>(cluster.map_shared_rank(shares, owner) + (rank * per + row - owner * per) * kTileCols + col) =
                    make_float2(acc[t][j][2 * h], acc[t][j][2 * h + 1]);
            }
    cluster.sync();  // every partial has arrived
#pragma unroll
    for (int j = 0; j < kMaxCells; j++) {
        const int i = threadIdx.x + j * kTileThreads, row = rank * per + i / kTileCols, col = col0 + i % kTileCols;
        if (i >= per * kTileCols || row >= m || col >= n) continue;
        float v = 0.0f;
        for (int s = 0; s < splits; s++) v += shares[s * per * kTileCols + i];  // in rank order: deterministic
        v += bias ? to_f(bias[col]) : 0.0f;
        if constexpr (K > 0) {
            if (conv_tile) {  // x_c rounded to T first, as the unfused path stores it
                chan.load_state(held[j]);
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
    __trap();  // launched on sm_90+ only (tile_gemm in gemm.cu checks)
#endif
}

// tile_gemm_kernel's dynamic shared memory in bytes.
inline size_t tile_smem_bytes(GemmSplit split) {
    const int per = (kTileRows + split.splits - 1) / split.splits;
    return 2 * kTileRows * (split.slice + kGemmPad) * 2 + split.splits * per * kTileCols * sizeof(float);
}

}  // namespace mamba
