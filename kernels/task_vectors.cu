// Layer-wise AdaMerging on task vectors held on the device: each step's merge of a parameter tensor, and the
// contraction of its gradient with every task vector (the coefficients' gradient).

#include "common.cuh"

// out = base + Σ_t lambdas[t]·tasks[t] over n values, tasks [T, n]: the experts in order, each product
// rounded before it is added, as torch's `state_dict[name] + param * w` and the CPU's merge
// (src/ops/task_vectors.rs) compute it, so that all three give the same bits. __fmul_rn and __fadd_rn keep
// NVRTC from fusing them into one fma.
extern "C" __global__ void merge_rounded(const float* __restrict__ base, const float* __restrict__ tasks,
                                         const float* __restrict__ lambdas, float* __restrict__ out, int n,
                                         int experts) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        float v = base[i];
        for (int t = 0; t < experts; ++t) v = __fadd_rn(v, __fmul_rn(tasks[(size_t)t * n + i], lambdas[t]));
        out[i] = v;
    }
}

#define DOT_THREADS 256
#define DOT_CHUNK (DOT_THREADS * 32)

// partial [2·chunks, T]: Σ_i tasks[t, i]·g[i] over chunk k of DOT_CHUNK values, in f64, split into rows 2k
// (hi) and 2k+1 (lo) for `column_sums`. Grid (chunks, T), 256 threads.
extern "C" __global__ void __launch_bounds__(DOT_THREADS)
    task_vector_dots(const float* __restrict__ tasks, const float* __restrict__ g, float* __restrict__ partial, int n) {
    __shared__ double scratch[32];
    const int t = blockIdx.y, experts = gridDim.y;
    const size_t first = (size_t)blockIdx.x * DOT_CHUNK;
    const size_t last = first + DOT_CHUNK < (size_t)n ? first + DOT_CHUNK : (size_t)n;
    const float* tau = tasks + (size_t)t * n;
    double s = 0.0;
    for (size_t i = first + threadIdx.x; i < last; i += DOT_THREADS) s += (double)tau[i] * (double)g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        const size_t hi = (size_t)2 * blockIdx.x * experts + t;
        store_split(s, partial + hi, partial + hi + experts);
    }
}
