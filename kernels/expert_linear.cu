// WEMoE's linear layer on the GPU: y_r = act(x_r · W_rᵀ + b_r) for each route r (a sample in per-sample
// routing, a group of samples in batch routing), with W_r = W0 + Σ_t c[r,t]·τ_t formed tile by tile in
// shared memory: no per-route weight ever reaches device memory. With zero experts it is a plain linear
// layer. Blocks of neighbouring routes take the same weight tile, so the T+1 source tiles are read from
// device memory about once and from L2 by the other routes.
//
// One 64×64 output tile per block of 256 threads, each thread 4×4 outputs, k in steps of 16 (a plain
// FP32 SIMT tile: the exact mode; see BENCHMARKS.md for how it compares with cuBLAS).

#include "simt_tile.cuh"

#define EL_BM 64
#define EL_BN 64
#define EL_BK 16
#define EL_THREADS 256
#define EL_MAX_EXPERTS 64

// C[m, n] = Σ_k A[m, k] · B(k, n) for one tile, with A the route's rows (row-major, K wide) and B the
// merged weight: B(k, n) = W[n, k] when WEIGHT_IS_N_BY_K (the forward, W [out, in] with k = in), else
// B(k, n) = W[k, n] (the input gradient, W [out, in] with k = out). `coeff` is in shared memory.
template <bool WEIGHT_IS_N_BY_K>
static __device__ __forceinline__ void merged_weight_gemm_tile(const float* __restrict__ a, int a_rows, int K, int N,
                                               const float* __restrict__ w0, const float* __restrict__ tau,
                                               const float* coeff, int experts, int n0, float acc[4][4]) {
    __shared__ float as[EL_BK][EL_BM + 1];
    __shared__ float bs[EL_BK][EL_BN + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const size_t weight_size = (size_t)K * N;
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += EL_BK) {
        for (int e = tid; e < EL_BM * EL_BK; e += EL_THREADS) {
            const int m = e / EL_BK, k = e % EL_BK;
            as[k][m] = (m < a_rows && k0 + k < K) ? a[(size_t)m * K + k0 + k] : 0.0f;
        }
        for (int e = tid; e < EL_BN * EL_BK; e += EL_THREADS) {
            int n, k;
            if (WEIGHT_IS_N_BY_K) {
                n = e / EL_BK;
                k = e % EL_BK;
            } else {
                k = e / EL_BN;
                n = e % EL_BN;
            }
            float v = 0.0f;
            if (n0 + n < N && k0 + k < K) {
                const size_t at = WEIGHT_IS_N_BY_K ? (size_t)(n0 + n) * K + k0 + k : (size_t)(k0 + k) * N + n0 + n;
                v = w0[at];
                // fmaf written out, as in every merge: NVRTC fuses `v += c·τ` anyway, the host compiler of the
                // emulation does not, and every candidate kernel must round as the others do.
                for (int t = 0; t < experts; ++t) v = fmaf(coeff[t], tau[t * weight_size + at], v);
            }
            bs[k][n] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < EL_BK; ++k) {
            float av[4], bv[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = as[k][ty + 16 * i];
            #pragma unroll
            for (int j = 0; j < 4; ++j) bv[j] = bs[k][tx + 16 * j];
            #pragma unroll
            for (int i = 0; i < 4; ++i)
                #pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// x [routes·rows_per_route, in], w0 [out, in], tau [experts, out, in], b0 [out] (may be null),
// tau_b [experts, out] (may be null), coeff [routes, experts]; writes y [rows, out] = act(z) and, when
// `pre` is not null, the pre-activation z. Grid (routes, ⌈rows_per_route/64⌉, ⌈out/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(EL_THREADS)
    expert_linear_forward(const float* __restrict__ x, const float* __restrict__ w0, const float* __restrict__ tau,
                          const float* __restrict__ b0, const float* __restrict__ tau_b,
                          const float* __restrict__ coeff, float* __restrict__ pre, float* __restrict__ y,
                          int rows_per_route, int in_features, int out_features, int experts, int act) {
    __shared__ float c[EL_MAX_EXPERTS];
    const int route = blockIdx.x, m0 = blockIdx.y * EL_BM, n0 = blockIdx.z * EL_BN;
    load_coefficients(coeff, route, experts, c);
    const size_t row0 = (size_t)route * rows_per_route + m0;
    const int rows = min(EL_BM, rows_per_route - m0);
    float acc[4][4];
    merged_weight_gemm_tile<true>(x + row0 * in_features, rows, in_features, out_features, w0, tau, c, experts, n0,
                                  acc);
    store_forward_tile(acc, c, experts, b0, tau_b, pre, y, row0, rows, n0, out_features, act);
}

// The input gradient: dx_r = dy_r · W_r, dy [rows, out], dx [rows, in]. Grid (routes, ⌈rows/64⌉, ⌈in/64⌉).
extern "C" __global__ void __launch_bounds__(EL_THREADS)
    expert_linear_backward_input(const float* __restrict__ dy, const float* __restrict__ w0,
                                 const float* __restrict__ tau, const float* __restrict__ coeff,
                                 float* __restrict__ dx, int rows_per_route, int in_features, int out_features,
                                 int experts) {
    __shared__ float c[EL_MAX_EXPERTS];
    const int route = blockIdx.x, m0 = blockIdx.y * EL_BM, n0 = blockIdx.z * EL_BN;
    load_coefficients(coeff, route, experts, c);
    const size_t row0 = (size_t)route * rows_per_route + m0;
    const int rows = min(EL_BM, rows_per_route - m0);
    float acc[4][4];
    merged_weight_gemm_tile<false>(dy + row0 * out_features, rows, out_features, in_features, w0, tau, c, experts,
                                   n0, acc);
    store_tile(acc, dx, row0, rows, n0, in_features);
}

// W = W0 + Σ_t c[t]·τ_t for one route, materialised: what the fused kernels avoid, kept for the batch-reduced
// dense formulation and for benchmarks. w0 [size], tau [experts, size], coeff [experts], out [size].
extern "C" __global__ void merge_experts(const float* __restrict__ w0, const float* __restrict__ tau,
                                         const float* __restrict__ coeff, float* __restrict__ out, int size,
                                         int experts) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)size;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = w0[i];
        for (int t = 0; t < experts; ++t) v = fmaf(coeff[t], tau[(size_t)t * size + i], v);
        out[i] = v;
    }
}
