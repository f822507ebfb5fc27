// How the f32 SIMT kernels write their output tiles. Each of a block's 256 threads, (tx, ty) = (tid % 16,
// tid / 16), holds acc[i][j] for i < 4 and j < Layout::COLS, at tile row Layout::row(ty, i) and column
// Layout::col(tx, j).
#pragma once

#include "common.cuh"

// 64×64 tiles, 4×4 per thread, rows ty + 16·i and columns tx + 16·j (expert_linear.cu,
// expert_linear_grouped.cu, expert_linear_staged.cu).
struct Simt4x4 {
    static constexpr int COLS = 4;
    static __device__ __forceinline__ int row(int ty, int i) { return ty + 16 * i; }
    static __device__ __forceinline__ int col(int tx, int j) { return tx + 16 * j; }
};

// A forward tile of one route: z = acc + b0 + Σ_t c[t]·β_t (no bias when b0 is null), pre = z when not null,
// y = act(z), into rows row0 + (0..rows) and columns from n0 of N-wide outputs.
template <typename Layout = Simt4x4>
static __device__ __forceinline__ void store_forward_tile(const float acc[4][Layout::COLS], const float* c,
                                                          int experts, const float* __restrict__ b0,
                                                          const float* __restrict__ tau_b, float* __restrict__ pre,
                                                          float* __restrict__ y, size_t row0, int rows, int n0, int N,
                                                          int act) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int j = 0; j < Layout::COLS; ++j) {
        const int n = n0 + Layout::col(tx, j);
        if (n >= N) continue;
        float bias = 0.0f;
        if (b0) {
            bias = b0[n];
            for (int t = 0; t < experts; ++t) bias = fmaf(c[t], tau_b[(size_t)t * N + n], bias);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = Layout::row(ty, i);
            if (m >= rows) continue;
            const float z = acc[i][j] + bias;
            const size_t at = (row0 + m) * N + n;
            if (pre) pre[at] = z;
            y[at] = activate(z, act);
        }
    }
}

// A product's tile as it is: out[row0 + m, n0 + n] = acc for the rows and columns in range.
template <typename Layout = Simt4x4>
static __device__ __forceinline__ void store_tile(const float acc[4][Layout::COLS], float* __restrict__ out,
                                                  size_t row0, int rows, int n0, int N) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = Layout::row(ty, i);
        if (m >= rows) continue;
#pragma unroll
        for (int j = 0; j < Layout::COLS; ++j) {
            const int n = n0 + Layout::col(tx, j);
            if (n < N) out[(row0 + m) * N + n] = acc[i][j];
        }
    }
}
