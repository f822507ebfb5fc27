// Gradients of the expert linear layer with respect to what is learned or routed:
//  - the router gradient dc[r,t] = <τ_t, G_r> + <β_t, Σ_rows dy_r> with G_r = dy_rᵀ·x_r, contracted tile by
//    tile against the task vectors: each block forms one 64×64 tile of G_r in registers and dots it with
//    every τ_t tile, so G_r never reaches device memory;
//  - the plain weight gradient dW = dyᵀ·x, db = Σ_rows dy (the router's own linear layers).
// Per-tile partial sums are written out and reduced in a fixed order, so results do not depend on the
// order in which blocks run.

#include "common.cuh"

#define EG_TILE 64
#define EG_ROWS 16
#define EG_THREADS 256
#define EG_EXPERT_CHUNK 8  // = the block's warps: one warp reduces each expert's sum

// acc[a][b] = Σ_rows dy[row, o0+ty+16a] · x[row, i0+tx+16b] over `rows` rows; dsum[a] = Σ_rows dy[row, o]
// (only in threads with tx == 0).
static __device__ __forceinline__ void outer_product_tile(const float* __restrict__ x, const float* __restrict__ dy, int rows,
                                          int in_features, int out_features, int o0, int i0, float acc[4][4],
                                          float dsum[4]) {
    __shared__ float ds[EG_ROWS][EG_TILE + 1];
    __shared__ float xs[EG_ROWS][EG_TILE + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        dsum[a] = 0.0f;
        #pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.0f;
    }
    for (int r0 = 0; r0 < rows; r0 += EG_ROWS) {
        for (int e = tid; e < EG_ROWS * EG_TILE; e += EG_THREADS) {
            const int r = e / EG_TILE, col = e % EG_TILE;
            const bool row_ok = r0 + r < rows;
            ds[r][col] = (row_ok && o0 + col < out_features) ? dy[(size_t)(r0 + r) * out_features + o0 + col] : 0.0f;
            xs[r][col] = (row_ok && i0 + col < in_features) ? x[(size_t)(r0 + r) * in_features + i0 + col] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < EG_ROWS; ++r) {
            float dv[4], xv[4];
            #pragma unroll
            for (int a = 0; a < 4; ++a) dv[a] = ds[r][ty + 16 * a];
            #pragma unroll
            for (int b = 0; b < 4; ++b) xv[b] = xs[r][tx + 16 * b];
            #pragma unroll
            for (int a = 0; a < 4; ++a)
                #pragma unroll
                for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(dv[a], xv[b], acc[a][b]);
            if (tx == 0)
                #pragma unroll
                for (int a = 0; a < 4; ++a) dsum[a] += dv[a];
        }
        __syncthreads();
    }
}

// x [routes·rows_per_route, in], dy [routes·rows_per_route, out], tau [experts, out, in], tau_b [experts, out]
// (may be null); partial [routes, tiles, experts] with tiles = gridDim.y·gridDim.z.
// Grid (routes, ⌈out/64⌉, ⌈in/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(EG_THREADS)
    expert_linear_backward_coeff(const float* __restrict__ x, const float* __restrict__ dy,
                                 const float* __restrict__ tau, const float* __restrict__ tau_b,
                                 float* __restrict__ partial, int rows_per_route, int in_features, int out_features,
                                 int experts) {
    // Per-thread partial sums of up to EG_EXPERT_CHUNK experts at a time, then one fixed-order reduction.
    __shared__ float scratch[EG_EXPERT_CHUNK][EG_THREADS + 1];
    const int route = blockIdx.x, o0 = blockIdx.y * EG_TILE, i0 = blockIdx.z * EG_TILE;
    const int tile = blockIdx.y * gridDim.z + blockIdx.z, tiles = gridDim.y * gridDim.z;
    const size_t row0 = (size_t)route * rows_per_route;
    float acc[4][4], dsum[4];
    outer_product_tile(x + row0 * in_features, dy + row0 * out_features, rows_per_route, in_features, out_features,
                       o0, i0, acc, dsum);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, lane = tid % 32, warp = tid / 32;
    const size_t weight_size = (size_t)in_features * out_features;
    for (int t0 = 0; t0 < experts; t0 += EG_EXPERT_CHUNK) {
#pragma unroll
        for (int u = 0; u < EG_EXPERT_CHUNK; ++u) {
            const int t = t0 + u;
            float s = 0.0f;
            if (t < experts) {
                const float* tt = tau + t * weight_size;
#pragma unroll
                for (int a = 0; a < 4; ++a) {
                    const int o = o0 + ty + 16 * a;
                    if (o >= out_features) continue;
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        const int i = i0 + tx + 16 * b;
                        if (i < in_features) s = fmaf(tt[(size_t)o * in_features + i], acc[a][b], s);
                    }
                    if (tau_b && tx == 0 && blockIdx.z == 0) s = fmaf(tau_b[(size_t)t * out_features + o], dsum[a], s);
                }
            }
            scratch[u][tid] = s;
        }
        __syncthreads();
        // Warp w sums expert t0 + w over the block's threads, in the same order every time.
        if (warp < EG_EXPERT_CHUNK && t0 + warp < experts) {
            float s = 0.0f;
            for (int k = lane; k < EG_THREADS; k += 32) s += scratch[warp][k];
            s = warp_sum(s);
            if (lane == 0) partial[((size_t)route * tiles + tile) * experts + t0 + warp] = s;
        }
        __syncthreads();
    }
}

// out[r, t] = Σ_tile partial[r, tile, t], tiles in order. One thread per (r, t).
extern "C" __global__ void reduce_tiles(const float* __restrict__ partial, float* __restrict__ out, int routes,
                                        int tiles, int experts) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= routes * experts) return;
    const int r = i / experts, t = i % experts;
    float s = 0.0f;
    for (int k = 0; k < tiles; ++k) s += partial[((size_t)r * tiles + k) * experts + t];
    out[i] = s;
}

// dW [out, in] = dyᵀ·x over all rows, and db [out] = Σ_rows dy (db may be null). Overwrites both.
// Grid (1, ⌈out/64⌉, ⌈in/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(EG_THREADS)
    linear_backward_weight(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dw,
                           float* __restrict__ db, int rows, int in_features, int out_features) {
    const int o0 = blockIdx.y * EG_TILE, i0 = blockIdx.z * EG_TILE;
    float acc[4][4], dsum[4];
    outer_product_tile(x, dy, rows, in_features, out_features, o0, i0, acc, dsum);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    #pragma unroll
    for (int a = 0; a < 4; ++a) {
        const int o = o0 + ty + 16 * a;
        if (o >= out_features) continue;
        #pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int i = i0 + tx + 16 * b;
            if (i < in_features) dw[(size_t)o * in_features + i] = acc[a][b];
        }
        if (db && tx == 0 && blockIdx.z == 0) db[o] = dsum[a];
    }
}
