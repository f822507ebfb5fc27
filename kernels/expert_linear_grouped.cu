// The WEMoE linear layer's forward with R routes per block (R = 2 or 4): the same as expert_linear_forward,
// but each staged element of W0 and of every τ_t is loaded once and merged with R routes' coefficients,
// so the task vectors' loads (the latency-bound part of the fused kernel on an H200, BENCHMARKS.md) drop
// R-fold, at the price of R accumulator tiles per thread and ⌈routes/R⌉ blocks per tile column. Which R is
// fastest is for the GPU benchmark to say; the launch wrapper takes it as a parameter.

#include "simt_tile.cuh"

#define ELG_BM 64
#define ELG_BN 64
#define ELG_BK 16
#define ELG_THREADS 256
#define ELG_MAX_EXPERTS 64

template <int R>
static __device__ __forceinline__ void grouped_forward(const float* __restrict__ x, const float* __restrict__ w0,
                                                       const float* __restrict__ tau, const float* __restrict__ b0,
                                                       const float* __restrict__ tau_b, const float* __restrict__ coeff,
                                                       float* __restrict__ pre, float* __restrict__ y, int routes,
                                                       int rows_per_route, int K, int N, int experts, int act) {
    __shared__ float c[R][ELG_MAX_EXPERTS];
    __shared__ float as[R][ELG_BK][ELG_BM + 1];
    __shared__ float bs[R][ELG_BK][ELG_BN + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int first = blockIdx.x * R, m0 = blockIdx.y * ELG_BM, n0 = blockIdx.z * ELG_BN;
    const int here = min(R, routes - first);  // routes in this block (the last block may hold fewer)
    const int rows = min(ELG_BM, rows_per_route - m0);
    for (int e = tid; e < R * experts; e += ELG_THREADS) {
        const int r = e / experts, t = e % experts;
        c[r][t] = r < here ? coeff[(size_t)(first + r) * experts + t] : 0.0f;
    }
    __syncthreads();
    const size_t weight_size = (size_t)K * N;
    float acc[R][4][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[r][i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += ELG_BK) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float* a = x + ((size_t)(first + r) * rows_per_route + m0) * K;
            for (int e = tid; e < ELG_BM * ELG_BK; e += ELG_THREADS) {
                const int m = e / ELG_BK, k = e % ELG_BK;
                as[r][k][m] = (r < here && m < rows && k0 + k < K) ? a[(size_t)m * K + k0 + k] : 0.0f;
            }
        }
        for (int e = tid; e < ELG_BN * ELG_BK; e += ELG_THREADS) {
            const int n = e / ELG_BK, k = e % ELG_BK;
            float merged[R];
            const bool ok = n0 + n < N && k0 + k < K;
            const size_t at = (size_t)(n0 + n) * K + k0 + k;
            const float base = ok ? w0[at] : 0.0f;
#pragma unroll
            for (int r = 0; r < R; ++r) merged[r] = base;
            for (int t = 0; t < experts; ++t) {
                const float v = ok ? tau[t * weight_size + at] : 0.0f;  // loaded once for all R routes
#pragma unroll
                for (int r = 0; r < R; ++r) merged[r] = fmaf(c[r][t], v, merged[r]);
            }
#pragma unroll
            for (int r = 0; r < R; ++r) bs[r][k][n] = merged[r];
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int k = 0; k < ELG_BK; ++k) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = as[r][k][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) bv[j] = bs[r][k][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[r][i][j] = fmaf(av[i], bv[j], acc[r][i][j]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= here) break;
        const size_t row0 = (size_t)(first + r) * rows_per_route + m0;
        store_forward_tile(acc[r], c[r], experts, b0, tau_b, pre, y, row0, rows, n0, N, act);
    }
}

// As expert_linear_forward, two routes per block. Grid (⌈routes/2⌉, ⌈rows_per_route/64⌉, ⌈out/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(ELG_THREADS)
    expert_linear_forward_x2(const float* __restrict__ x, const float* __restrict__ w0, const float* __restrict__ tau,
                             const float* __restrict__ b0, const float* __restrict__ tau_b,
                             const float* __restrict__ coeff, float* __restrict__ pre, float* __restrict__ y,
                             int routes, int rows_per_route, int in_features, int out_features, int experts,
                             int act) {
    grouped_forward<2>(x, w0, tau, b0, tau_b, coeff, pre, y, routes, rows_per_route, in_features, out_features,
                       experts, act);
}

// As expert_linear_forward, four routes per block. Grid (⌈routes/4⌉, ⌈rows_per_route/64⌉, ⌈out/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(ELG_THREADS)
    expert_linear_forward_x4(const float* __restrict__ x, const float* __restrict__ w0, const float* __restrict__ tau,
                             const float* __restrict__ b0, const float* __restrict__ tau_b,
                             const float* __restrict__ coeff, float* __restrict__ pre, float* __restrict__ y,
                             int routes, int rows_per_route, int in_features, int out_features, int experts,
                             int act) {
    grouped_forward<4>(x, w0, tau, b0, tau_b, coeff, pre, y, routes, rows_per_route, in_features, out_features,
                       experts, act);
}
