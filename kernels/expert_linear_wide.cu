// The WEMoE linear layer on a wider tile: 64 rows × 128 columns per block of 256 threads, each thread 4×8
// outputs whose operands it reads from shared memory as float4 (two reads of B and one of A per k instead
// of eight scalar ones: the 4×4 tile of expert_linear.cu is bound by shared-memory reads, at 0.35–0.45 of
// cuBLAS on an H200). That wider tile, tried with merges loaded as they are used, lost to the 4×4 one
// (fewer warps to hide the merge's loads, BENCHMARKS.md); here the T+1 weight sources are staged by cp.async
// as in expert_linear_staged.cu: each thread copies its two 16-byte pieces of every coming source tile into
// its own ring of shared-memory slots, EW_DEPTH − 1 tiles ahead, and merges them as they land (no barrier
// guards the ring: a thread reads only what it copied). Forward and input gradient, one route per block, f32.

// needs sm_80: cp.async

#include "simt_tile.cuh"

#define EW_BM 64
#define EW_BN 128
#define EW_BK 16
#define EW_THREADS 256
#define EW_DEPTH 4
#define EW_PIECES 2  // 4-float pieces per thread of one 128 × 16 source tile
#define EW_MAX_EXPERTS 64

// acc = A · B_r over the whole k range for one route's row tile (`rows` rows of `a`, K wide, row-major),
// B_r(k, n) the merged weight: W[n, k] when FORWARD (W [out, in], k = in), else W[k, n] (the input
// gradient: k = out, n = in). Thread (tx, ty) = (tid % 16, tid / 16) holds rows 4·ty + i and columns
// 4·tx + j and 64 + 4·tx + j (i, j < 4) in acc[i][j] and acc[i][4 + j].
template <bool FORWARD>
static __device__ __forceinline__ void wide_product(const float* __restrict__ a, int rows,
                                                    const float* __restrict__ w0, const float* __restrict__ tau,
                                                    const float* c, int experts, int K, int N, int n0,
                                                    float acc[4][8]) {
    __shared__ __align__(16) float ring[EW_DEPTH][EW_PIECES][EW_THREADS * 4];
    __shared__ __align__(16) float as[EW_BK][EW_BM + 4];  // A transposed, k × m
    __shared__ __align__(16) float bs[EW_BK][EW_BN + 4];  // the merged B, k × n
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int ld = FORWARD ? K : N, row_limit = FORWARD ? N : K;
    const bool vector = ld % 4 == 0 && aligned16(w0) && (experts == 0 || aligned16(tau));
    const size_t weight_size = (size_t)K * N;
    const int sources = experts + 1, total = ((K + EW_BK - 1) / EW_BK) * sources;
    // Piece h of this thread, p = tid + 256·h, in the weight's own layout: forward (a tile of 128 n × 16 k)
    // row n0 + p/4, columns k0 + 4·(p%4) + 0..3; input gradient (16 k × 128 n) row k0 + p/32, columns
    // n0 + 4·(p%32) + 0..3.
    int piece_row[EW_PIECES], piece_col[EW_PIECES];
#pragma unroll
    for (int h = 0; h < EW_PIECES; ++h) {
        const int p = tid + EW_THREADS * h;
        piece_row[h] = FORWARD ? p / 4 : p / 32;
        piece_col[h] = FORWARD ? 4 * (p % 4) : 4 * (p % 32);
    }

    // Copies source tile j (k-step j / sources, source j % sources) into slot j % EW_DEPTH as one group
    // (an empty one past the last tile).
    auto issue = [&](int j) {
        if (j < total) {
            const int k0 = (j / sources) * EW_BK, t = j % sources;
            const float* src = t == 0 ? w0 : tau + (size_t)(t - 1) * weight_size;
#pragma unroll
            for (int h = 0; h < EW_PIECES; ++h) {
                const int row = (FORWARD ? n0 : k0) + piece_row[h], col = (FORWARD ? k0 : n0) + piece_col[h];
                copy_piece_async(&ring[j % EW_DEPTH][h][tid * 4], src, row, col, row_limit, ld, vector);
            }
        }
        copy_async_commit();
    };
    for (int j = 0; j < EW_DEPTH - 1; ++j) issue(j);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) acc[i][jj] = 0.0f;

    const int a_row = tid / 4, a_col = 4 * (tid % 4);  // this thread's 4 elements of the A tile
    int j = 0;
    for (int k0 = 0; k0 < K; k0 += EW_BK) {
        float a_next[4];  // loaded now, so that their latency overlaps the merge
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int k = k0 + a_col + q;
            a_next[q] = (a_row < rows && k < K) ? a[(size_t)a_row * K + k] : 0.0f;
        }
        float merged[EW_PIECES][4];
#pragma unroll
        for (int h = 0; h < EW_PIECES; ++h)
#pragma unroll
            for (int q = 0; q < 4; ++q) merged[h][q] = 0.0f;
        for (int t = 0; t < sources; ++t, ++j) {
            copy_async_wait<EW_DEPTH - 2>();  // tile j has landed
            float piece[EW_PIECES][4];
#pragma unroll
            for (int h = 0; h < EW_PIECES; ++h) {
                const float4 v = *reinterpret_cast<const float4*>(&ring[j % EW_DEPTH][h][tid * 4]);
                piece[h][0] = v.x;
                piece[h][1] = v.y;
                piece[h][2] = v.z;
                piece[h][3] = v.w;
            }
            issue(j + EW_DEPTH - 1);  // into slot (j − 1) % EW_DEPTH, read by this thread one tile ago
            const float coef = t == 0 ? 1.0f : c[t - 1];
#pragma unroll
            for (int h = 0; h < EW_PIECES; ++h)
#pragma unroll
                for (int q = 0; q < 4; ++q) merged[h][q] = fmaf(coef, piece[h][q], merged[h][q]);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            as[a_col + q][a_row] = a_next[q];
#pragma unroll
            for (int h = 0; h < EW_PIECES; ++h) {
                if (FORWARD)
                    bs[piece_col[h] + q][piece_row[h]] = merged[h][q];
                else
                    bs[piece_row[h]][piece_col[h] + q] = merged[h][q];
            }
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < EW_BK; ++k) {
            const float4 a4 = *reinterpret_cast<const float4*>(&as[k][4 * ty]);
            const float4 b_lo = *reinterpret_cast<const float4*>(&bs[k][4 * tx]);
            const float4 b_hi = *reinterpret_cast<const float4*>(&bs[k][64 + 4 * tx]);
            const float av[4] = {a4.x, a4.y, a4.z, a4.w};
            const float bv[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int jj = 0; jj < 8; ++jj) acc[i][jj] = fmaf(av[i], bv[jj], acc[i][jj]);
        }
        __syncthreads();
    }
    copy_async_wait<0>();  // only empty groups remain
}

// The block's tile: route blockIdx.x, its rows from m0 = 64·blockIdx.y (global row row0, `rows` of them
// inside the route), columns from n0 = 128·blockIdx.z.
struct WideTile {
    int route, n0, rows;
    size_t row0;
};

static __device__ __forceinline__ WideTile wide_tile(int rows_per_route) {
    const int route = blockIdx.x, m0 = blockIdx.y * EW_BM;
    return WideTile{route, (int)blockIdx.z * EW_BN, min(EW_BM, rows_per_route - m0),
                    (size_t)route * rows_per_route + m0};
}

// Where this file's accumulators land: 64×128 tiles, 4×8 per thread, rows 4·ty + i, columns 4·tx + j and
// 64 + 4·tx + j (the float4 reads of wide_product).
struct Wide4x8 {
    static constexpr int COLS = 8;
    static __device__ __forceinline__ int row(int ty, int i) { return 4 * ty + i; }
    static __device__ __forceinline__ int col(int tx, int j) { return j < 4 ? 4 * tx + j : 64 + 4 * tx + j - 4; }
};

// As expert_linear_forward (x [routes·rows_per_route, in], W0 [out, in], τ [T, out, in], b0 [out] or null,
// β [T, out] or null, coeff [routes, T] or null when T = 0; y = act(z), pre = z when not null) on 64 × 128
// tiles. Grid (routes, ⌈rows_per_route/64⌉, ⌈out/128⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(EW_THREADS)
    expert_linear_forward_wide(const float* __restrict__ x, const float* __restrict__ w0,
                               const float* __restrict__ tau, const float* __restrict__ b0,
                               const float* __restrict__ tau_b, const float* __restrict__ coeff,
                               float* __restrict__ pre, float* __restrict__ y, int rows_per_route, int in_features,
                               int out_features, int experts, int act) {
    __shared__ float c[EW_MAX_EXPERTS];
    const WideTile tile = wide_tile(rows_per_route);
    load_coefficients(coeff, tile.route, experts, c);
    float acc[4][8];
    wide_product<true>(x + tile.row0 * in_features, tile.rows, w0, tau, c, experts, in_features, out_features,
                       tile.n0, acc);
    store_forward_tile<Wide4x8>(acc, c, experts, b0, tau_b, pre, y, tile.row0, tile.rows, tile.n0, out_features,
                                act);
}

// As expert_linear_backward_input (dx_r = dy_r · W_r, dy [rows, out], dx [rows, in]) on 64 × 128 tiles.
// Grid (routes, ⌈rows_per_route/64⌉, ⌈in/128⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(EW_THREADS)
    expert_linear_backward_input_wide(const float* __restrict__ dy, const float* __restrict__ w0,
                                      const float* __restrict__ tau, const float* __restrict__ coeff,
                                      float* __restrict__ dx, int rows_per_route, int in_features,
                                      int out_features, int experts) {
    __shared__ float c[EW_MAX_EXPERTS];
    const WideTile tile = wide_tile(rows_per_route);
    load_coefficients(coeff, tile.route, experts, c);
    float acc[4][8];
    wide_product<false>(dy + tile.row0 * out_features, tile.rows, w0, tau, c, experts, out_features, in_features,
                        tile.n0, acc);
    store_tile<Wide4x8>(acc, dx, tile.row0, tile.rows, tile.n0, in_features);
}
