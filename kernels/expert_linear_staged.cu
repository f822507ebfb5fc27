// The WEMoE linear layer with its weight sources staged by cp.async (sm_80 and later): the products of
// expert_linear.cu, but the T+1 loads behind each merged element no longer wait on L2 one after another (the
// plain kernel's bound on an H200, BENCHMARKS.md). Every source tile of a k-step (W0, then τ_1..τ_T) is 256
// pieces of 4 floats, one per thread; each thread copies its piece of the coming tiles into its own ring of
// shared-memory slots, DEPTH − 1 tiles ahead, and merges them as they land. A thread reads back only the
// slots it filled, so its own cp.async.wait_group orders the ring and no barrier does. R routes per block
// share each staged piece. With zero experts it is a plain linear layer (W0 alone is staged).
//
// Output tiles as in expert_linear.cu: 64×64 per route and block of 256 threads, 4×4 per thread, k in steps
// of 16, f32 throughout (the exact mode).

// needs sm_80: cp.async

#include "simt_tile.cuh"

#define ES_BM 64
#define ES_BN 64
#define ES_BK 16
#define ES_THREADS 256
#define ES_MAX_EXPERTS 64
#define ES_A_STRIDE (ES_BK + 4)  // rows of 20 floats: 16-byte aligned, two rows per warp read in different banks

// acc[r] = A_r · B_r over the whole k range for R routes' row tiles, B_r(k, n) the route's merged weight:
// W[n, k] when FORWARD (W [out, in], k = in, n = out), else W[k, n] (the input gradient: W [out, in],
// k = out, n = in). `a` holds R routes' tiles `route_stride` floats apart, each `rows` × K row-major (a route
// past `here` reads nothing); `c` the routes' coefficients in shared memory.
template <int R, int DEPTH, bool FORWARD>
static __device__ __forceinline__ void staged_product(const float* __restrict__ a, size_t route_stride, int here,
                                                      int rows, const float* __restrict__ w0,
                                                      const float* __restrict__ tau, const float (*c)[ES_MAX_EXPERTS],
                                                      int experts, int K, int N, int n0, float acc[R][4][4]) {
    __shared__ __align__(16) float ring[DEPTH][ES_THREADS * 4];
    __shared__ float as[R][ES_BM][ES_A_STRIDE];
    __shared__ float bs[R][ES_BK][ES_BN + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    // This thread's piece of a source tile in the weight's own layout: 4 floats along the contiguous axis.
    // Forward: row n0 + tid/4 of W, columns k0 + 4·(tid%4) + 0..3; input gradient: row k0 + tid/16, columns
    // n0 + 4·(tid%16) + 0..3.
    const int piece_row = FORWARD ? tid / 4 : tid / 16, piece_col = FORWARD ? 4 * (tid % 4) : 4 * (tid % 16);
    const int ld = FORWARD ? K : N, row_limit = FORWARD ? N : K;
    const bool vector = ld % 4 == 0 && aligned16(w0) && (experts == 0 || aligned16(tau));
    const size_t weight_size = (size_t)K * N;
    const int sources = experts + 1, total = ((K + ES_BK - 1) / ES_BK) * sources;

    // Copies source tile j (k-step j / sources, source j % sources) into slot j % DEPTH, as one group; past
    // the last tile the group is empty, which keeps the wait's count uniform.
    auto issue = [&](int j) {
        if (j < total) {
            const int k0 = (j / sources) * ES_BK, t = j % sources;
            const float* src = t == 0 ? w0 : tau + (size_t)(t - 1) * weight_size;
            const int row = (FORWARD ? n0 : k0) + piece_row, col = (FORWARD ? k0 : n0) + piece_col;
            copy_piece_async(&ring[j % DEPTH][tid * 4], src, row, col, row_limit, ld, vector);
        }
        copy_async_commit();
    };
    for (int j = 0; j < DEPTH - 1; ++j) issue(j);
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) acc[r][i][jj] = 0.0f;

    // This thread's 4 elements of each route's A tile: row tid/4, columns k0 + 4·(tid%4) + 0..3.
    const int a_row = tid / 4, a_col = 4 * (tid % 4);
    int j = 0;
    for (int k0 = 0; k0 < K; k0 += ES_BK) {
        // The routes' A elements, loaded now so their latency overlaps the merge below.
        float a_next[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int k = k0 + a_col + q;
                a_next[r][q] = (r < here && a_row < rows && k < K) ? a[r * route_stride + (size_t)a_row * K + k] : 0.0f;
            }
        float merged[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) merged[r][q] = 0.0f;
        for (int t = 0; t < sources; ++t, ++j) {
            copy_async_wait<DEPTH - 2>();  // tile j has landed (j + DEPTH − 1 groups committed so far)
            const float4 v = *reinterpret_cast<const float4*>(&ring[j % DEPTH][tid * 4]);
            const float piece[4] = {v.x, v.y, v.z, v.w};
            issue(j + DEPTH - 1);  // into slot (j − 1) % DEPTH, read by this thread one tile ago
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float coef = t == 0 ? 1.0f : c[r][t - 1];
#pragma unroll
                for (int q = 0; q < 4; ++q) merged[r][q] = fmaf(coef, piece[q], merged[r][q]);
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (FORWARD)
                    bs[r][piece_col + q][piece_row] = merged[r][q];
                else
                    bs[r][piece_row][piece_col + q] = merged[r][q];
                as[r][a_row][a_col + q] = a_next[r][q];
            }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int k = 0; k < ES_BK; ++k) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = as[r][ty + 16 * i][k];
#pragma unroll
                for (int jj = 0; jj < 4; ++jj) bv[jj] = bs[r][k][tx + 16 * jj];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) acc[r][i][jj] = fmaf(av[i], bv[jj], acc[r][i][jj]);
            }
        __syncthreads();
    }
    copy_async_wait<0>();  // only empty groups remain; nothing is left in flight when the block ends
}

// Loads R routes' coefficients (zeros for routes past `here`) into shared memory.
template <int R>
static __device__ __forceinline__ void load_route_coefficients(const float* __restrict__ coeff, int first, int here,
                                                               int experts, float (*c)[ES_MAX_EXPERTS]) {
    for (int e = threadIdx.x; e < R * experts; e += blockDim.x) {
        const int r = e / experts, t = e % experts;
        c[r][t] = r < here ? coeff[(size_t)(first + r) * experts + t] : 0.0f;
    }
    __syncthreads();
}

template <int R, int DEPTH>
static __device__ __forceinline__ void staged_forward(const float* __restrict__ x, const float* __restrict__ w0,
                                                      const float* __restrict__ tau, const float* __restrict__ b0,
                                                      const float* __restrict__ tau_b, const float* __restrict__ coeff,
                                                      float* __restrict__ pre, float* __restrict__ y, int routes,
                                                      int rows_per_route, int K, int N, int experts, int act) {
    __shared__ float c[R][ES_MAX_EXPERTS];
    const int first = blockIdx.x * R, m0 = blockIdx.y * ES_BM, n0 = blockIdx.z * ES_BN;
    const int here = min(R, routes - first), rows = min(ES_BM, rows_per_route - m0);
    load_route_coefficients<R>(coeff, first, here, experts, c);
    float acc[R][4][4];
    const size_t route_stride = (size_t)rows_per_route * K;
    staged_product<R, DEPTH, true>(x + ((size_t)first * rows_per_route + m0) * K, route_stride, here, rows, w0, tau,
                                   c, experts, K, N, n0, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r >= here) break;
        const size_t row0 = (size_t)(first + r) * rows_per_route + m0;
        store_forward_tile(acc[r], c[r], experts, b0, tau_b, pre, y, row0, rows, n0, N, act);
    }
}

// As expert_linear_forward (x [routes·rows_per_route, in], W0 [out, in], τ [T, out, in], b0 [out] or null,
// β [T, out] or null, coeff [routes, T] or null when T = 0; y = act(z), pre = z when not null), sources
// staged by cp.async. Grid (routes, ⌈rows_per_route/64⌉, ⌈out/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(ES_THREADS)
    expert_linear_forward_staged(const float* __restrict__ x, const float* __restrict__ w0,
                                 const float* __restrict__ tau, const float* __restrict__ b0,
                                 const float* __restrict__ tau_b, const float* __restrict__ coeff,
                                 float* __restrict__ pre, float* __restrict__ y, int routes, int rows_per_route,
                                 int in_features, int out_features, int experts, int act) {
    staged_forward<1, 8>(x, w0, tau, b0, tau_b, coeff, pre, y, routes, rows_per_route, in_features, out_features,
                         experts, act);
}

// The same with two routes per block sharing each staged piece. Grid (⌈routes/2⌉, ⌈rows_per_route/64⌉,
// ⌈out/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(ES_THREADS)
    expert_linear_forward_staged_x2(const float* __restrict__ x, const float* __restrict__ w0,
                                    const float* __restrict__ tau, const float* __restrict__ b0,
                                    const float* __restrict__ tau_b, const float* __restrict__ coeff,
                                    float* __restrict__ pre, float* __restrict__ y, int routes, int rows_per_route,
                                    int in_features, int out_features, int experts, int act) {
    staged_forward<2, 6>(x, w0, tau, b0, tau_b, coeff, pre, y, routes, rows_per_route, in_features, out_features,
                         experts, act);
}

// As expert_linear_backward_input: dx_r = dy_r · W_r, dy [rows, out], dx [rows, in], sources staged by
// cp.async. Grid (routes, ⌈rows_per_route/64⌉, ⌈in/64⌉), 256 threads.
extern "C" __global__ void __launch_bounds__(ES_THREADS)
    expert_linear_backward_input_staged(const float* __restrict__ dy, const float* __restrict__ w0,
                                        const float* __restrict__ tau, const float* __restrict__ coeff,
                                        float* __restrict__ dx, int routes, int rows_per_route, int in_features,
                                        int out_features, int experts) {
    __shared__ float c[1][ES_MAX_EXPERTS];
    const int route = blockIdx.x, m0 = blockIdx.y * ES_BM, n0 = blockIdx.z * ES_BN;
    const int rows = min(ES_BM, rows_per_route - m0);
    load_route_coefficients<1>(coeff, route, 1, experts, c);
    float acc[1][4][4];
    const size_t row0 = (size_t)route * rows_per_route + m0;
    staged_product<1, 8, false>(dy + row0 * out_features, 0, 1, rows, w0, tau, c, experts, out_features,
                                in_features, n0, acc);
    store_tile(acc[0], dx, row0, rows, n0, in_features);
}
