// The output tile of the f32 SIMT kernels (expert_linear.cu, expert_linear_grouped.cu,
// expert_linear_staged.cu): 64×64 per block of 256 threads, thread (tx, ty) = (tid % 16, tid / 16) holding
// rows ty + 16·i and columns tx + 16·j (i, j < 4) in acc[i][j].
#pragma once

#include "common.cuh"

// A forward tile of one route: z = acc + b0 + Σ_t c[t]·β_t (no bias when b0 is null), pre = z when not null,
// y = act(z), into rows row0 + (0..rows) and columns n0 + (0..64) of N-wide outputs.
static __device__ __forceinline__ void store_forward_tile(const float acc[4][4], const float* c, int experts,
                                                          const float* __restrict__ b0,
                                                          const float* __restrict__ tau_b, float* __restrict__ pre,
                                                          float* __restrict__ y, size_t row0, int rows, int n0, int N,
                                                          int act) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int n = n0 + tx + 16 * j;
        if (n >= N) continue;
        float bias = 0.0f;
        if (b0) {
            bias = b0[n];
            for (int t = 0; t < experts; ++t) bias += c[t] * tau_b[(size_t)t * N + n];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int m = ty + 16 * i;
            if (m >= rows) continue;
            const float z = acc[i][j] + bias;
            const size_t at = (row0 + m) * N + n;
            if (pre) pre[at] = z;
            y[at] = activate(z, act);
        }
    }
}

// A product's tile as it is: out[row0 + m, n0 + n] = acc for the rows and columns in range.
static __device__ __forceinline__ void store_tile(const float acc[4][4], float* __restrict__ out, size_t row0,
                                                  int rows, int n0, int N) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = ty + 16 * i;
        if (m >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n < N) out[(row0 + m) * N + n] = acc[i][j];
        }
    }
}
