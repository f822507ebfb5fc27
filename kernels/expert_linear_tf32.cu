// The WEMoE linear layer's forward on tensor cores (`--precision tf32`, sm_80 and later): the merged weight
// W_r = W0 + Σ_t c[r,t]·τ_t is formed in f32 tile by tile in shared memory exactly as in expert_linear.cu,
// rounded to TF32 there, and multiplied with mma.sync.m16n8k8 (f32 accumulation). A 64×64 output tile per
// block of 4 warps, each warp 32×32 (2×4 MMA tiles), k in steps of 16.

#include "common.cuh"

#define ET_BM 64
#define ET_BN 64
#define ET_BK 16
#define ET_THREADS 128
#define ET_STRIDE (ET_BK + 4)  // rows of 20 words: a fragment's 32 lanes hit 32 different banks
#define ET_MAX_EXPERTS 64

// x [routes·rows_per_route, in], w0 [out, in], tau [experts, out, in], b0 [out] (may be null), tau_b
// [experts, out] (may be null), coeff [routes, experts]; y [rows, out] = act(x·W_rᵀ + b_r).
// Grid (routes, ⌈rows_per_route/64⌉, ⌈out/64⌉), 128 threads.
extern "C" __global__ void __launch_bounds__(ET_THREADS)
    expert_linear_forward_tf32(const float* __restrict__ x, const float* __restrict__ w0,
                               const float* __restrict__ tau, const float* __restrict__ b0,
                               const float* __restrict__ tau_b, const float* __restrict__ coeff,
                               float* __restrict__ y, int rows_per_route, int K, int N, int experts, int act) {
    __shared__ float c[ET_MAX_EXPERTS];
    __shared__ unsigned as[ET_BM][ET_STRIDE];  // x tile, m × k, TF32
    __shared__ unsigned bs[ET_BN][ET_STRIDE];  // merged weight tile, n × k, TF32
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int group = lane / 4, tig = lane % 4, wm = warp / 2, wn = warp % 2;
    const int route = blockIdx.x, m0 = blockIdx.y * ET_BM, n0 = blockIdx.z * ET_BN;
    for (int t = tid; t < experts; t += ET_THREADS) c[t] = coeff[(size_t)route * experts + t];
    __syncthreads();
    const size_t row0 = (size_t)route * rows_per_route + m0;
    const int rows = min(ET_BM, rows_per_route - m0);
    const size_t weight_size = (size_t)K * N;
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += ET_BK) {
        for (int e = tid; e < ET_BM * ET_BK; e += ET_THREADS) {
            const int m = e / ET_BK, k = e % ET_BK;
            as[m][k] = to_tf32((m < rows && k0 + k < K) ? x[(row0 + m) * K + k0 + k] : 0.0f);
        }
        for (int e = tid; e < ET_BN * ET_BK; e += ET_THREADS) {
            const int n = e / ET_BK, k = e % ET_BK;
            float v = 0.0f;
            if (n0 + n < N && k0 + k < K) {
                const size_t at = (size_t)(n0 + n) * K + k0 + k;
                v = w0[at];
                for (int t = 0; t < experts; ++t) v = fmaf(c[t], tau[t * weight_size + at], v);
            }
            bs[n][k] = to_tf32(v);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < ET_BK; kk += 8) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm * 32 + mi * 16 + group;
                a[mi][0] = as[r][kk + tig];
                a[mi][1] = as[r + 8][kk + tig];
                a[mi][2] = as[r][kk + tig + 4];
                a[mi][3] = as[r + 8][kk + tig + 4];
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = wn * 32 + ni * 8 + group;
                b[ni][0] = bs[n][kk + tig];
                b[ni][1] = bs[n][kk + tig + 4];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) mma_tf32_16x8x8(acc[mi][ni], a[mi], b[ni]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = n0 + wn * 32 + ni * 8 + 2 * tig + half;
            if (n >= N) continue;
            float bias = 0.0f;
            if (b0) {
                bias = b0[n];
                for (int t = 0; t < experts; ++t) bias = fmaf(c[t], tau_b[(size_t)t * N + n], bias);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int up = 0; up < 2; ++up) {
                    const int m = wm * 32 + mi * 16 + group + 8 * up;
                    if (m < rows) y[(row0 + m) * N + n] = activate(acc[mi][ni][2 * up + half] + bias, act);
                }
        }
    }
}
