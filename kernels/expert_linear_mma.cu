// The WEMoE linear layer's forward on tensor cores (`--precision tf32|bf16`, sm_80 and later): the merged
// weight W_r = W0 + Σ_t c[r,t]·τ_t is formed in f32 tile by tile in shared memory exactly as in
// expert_linear.cu, rounded to the operand format there, and multiplied with mma.sync (f32 accumulation):
// m16n8k8 on TF32 operands, m16n8k16 on bf16 ones. A 64×64 output tile per block of 4 warps, each warp 32×32
// (2×4 MMA tiles); the shared tiles hold 16 registers per row along k, so 16 TF32 or 32 bf16 inputs per step.

// needs sm_80: mma.sync on TF32 and bf16 operands

#include "common.cuh"

#define EM_BM 64
#define EM_BN 64  // = EM_BM: one staging loop serves both tiles
#define EM_WORDS 16  // registers per shared-tile row along k
#define EM_THREADS 128
#define EM_STRIDE (EM_WORDS + 4)  // rows of 20 words: a fragment's 32 lanes hit 32 different banks
#define EM_MAX_EXPERTS 64

// x [routes·rows_per_route, in], w0 [out, in], tau [experts, out, in], b0 [out] (may be null), tau_b
// [experts, out] (may be null), coeff [routes, experts]; y [rows, out] = act(x·W_rᵀ + b_r).
// Grid (routes, ⌈rows_per_route/64⌉, ⌈out/64⌉), 128 threads.
template <typename Operands>
static __device__ __forceinline__ void expert_linear_forward_mma(
    const float* __restrict__ x, const float* __restrict__ w0, const float* __restrict__ tau,
    const float* __restrict__ b0, const float* __restrict__ tau_b, const float* __restrict__ coeff,
    float* __restrict__ y, int rows_per_route, int K, int N, int experts, int act) {
    constexpr int per = Operands::per_register, bk = EM_WORDS * per;
    __shared__ float c[EM_MAX_EXPERTS];
    __shared__ unsigned as[EM_BM][EM_STRIDE];  // x tile, m × k
    __shared__ unsigned bs[EM_BN][EM_STRIDE];  // merged weight tile, n × k
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int group = lane / 4, tig = lane % 4, wm = warp / 2, wn = warp % 2;
    const int route = blockIdx.x, m0 = blockIdx.y * EM_BM, n0 = blockIdx.z * EM_BN;
    for (int t = tid; t < experts; t += EM_THREADS) c[t] = coeff[(size_t)route * experts + t];
    __syncthreads();
    const size_t row0 = (size_t)route * rows_per_route + m0;
    const int rows = min(EM_BM, rows_per_route - m0);
    const size_t weight_size = (size_t)K * N;
    float acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

    // One shared tile of the k-step at k0: element (i, k) is value(i, k), packed `per` to a register.
    auto stage = [&](unsigned (*tile)[EM_STRIDE], int k0, auto value) {
        for (int e = tid; e < EM_BM * EM_WORDS; e += EM_THREADS) {
            const int i = e / EM_WORDS, kw = e % EM_WORDS;
            float v[per];
#pragma unroll
            for (int j = 0; j < per; ++j) v[j] = value(i, k0 + kw * per + j);
            tile[i][kw] = Operands::pack(v);
        }
    };
    for (int k0 = 0; k0 < K; k0 += bk) {
        stage(as, k0, [&](int m, int k) { return (m < rows && k < K) ? x[(row0 + m) * K + k] : 0.0f; });
        stage(bs, k0, [&](int n, int k) {
            if (n0 + n >= N || k >= K) return 0.0f;
            const size_t at = (size_t)(n0 + n) * K + k;
            float v = w0[at];
            for (int t = 0; t < experts; ++t) v = fmaf(c[t], tau[t * weight_size + at], v);
            return v;
        });
        __syncthreads();
#pragma unroll
        for (int kw = 0; kw < EM_WORDS; kw += 8) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int r = wm * 32 + mi * 16 + group;
                a[mi][0] = as[r][kw + tig];
                a[mi][1] = as[r + 8][kw + tig];
                a[mi][2] = as[r][kw + tig + 4];
                a[mi][3] = as[r + 8][kw + tig + 4];
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int n = wn * 32 + ni * 8 + group;
                b[ni][0] = bs[n][kw + tig];
                b[ni][1] = bs[n][kw + tig + 4];
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) Operands::mma(acc[mi][ni], a[mi], b[ni]);
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

// Operands rounded to TF32 (10 mantissa bits).
extern "C" __global__ void __launch_bounds__(EM_THREADS)
    expert_linear_forward_tf32(const float* __restrict__ x, const float* __restrict__ w0,
                               const float* __restrict__ tau, const float* __restrict__ b0,
                               const float* __restrict__ tau_b, const float* __restrict__ coeff,
                               float* __restrict__ y, int rows_per_route, int K, int N, int experts, int act) {
    expert_linear_forward_mma<Tf32Operands>(x, w0, tau, b0, tau_b, coeff, y, rows_per_route, K, N, experts, act);
}

// Operands rounded to bf16 (7 mantissa bits).
extern "C" __global__ void __launch_bounds__(EM_THREADS)
    expert_linear_forward_bf16(const float* __restrict__ x, const float* __restrict__ w0,
                               const float* __restrict__ tau, const float* __restrict__ b0,
                               const float* __restrict__ tau_b, const float* __restrict__ coeff,
                               float* __restrict__ y, int rows_per_route, int K, int N, int experts, int act) {
    expert_linear_forward_mma<Bf16Operands>(x, w0, tau, b0, tau_b, coeff, y, rows_per_route, K, N, experts, act);
}
