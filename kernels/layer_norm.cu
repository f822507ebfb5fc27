// LayerNorm over the last axis: one block per row, statistics by block reductions (mean first, then the
// centred variance, as the CPU reference does), and its input gradient with frozen affine parameters.

#include "common.cuh"

#define LN_THREADS 256

// x, y [rows, width]. Grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layer_norm_forward(const float* __restrict__ x, const float* __restrict__ weight,
                       const float* __restrict__ bias, float* __restrict__ y, int width, float eps) {
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += row[i];
    const float mean = block_sum(s, scratch) / width;
    float q = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) q += (row[i] - mean) * (row[i] - mean);
    const float inv = rsqrtf(block_sum(q, scratch) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        y[(size_t)blockIdx.x * width + i] = (row[i] - mean) * inv * weight[i] + bias[i];
}

// dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ∘x̂)), ĝ = dy∘weight. Grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layer_norm_backward(const float* __restrict__ x, const float* __restrict__ weight,
                        const float* __restrict__ dy, float* __restrict__ dx, int width, float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += x[base + i];
    const float mean = block_sum(s, scratch) / width;
    float q = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) q += (x[base + i] - mean) * (x[base + i] - mean);
    const float inv = rsqrtf(block_sum(q, scratch) / width + eps);
    float sg = 0.0f, sgx = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float gh = dy[base + i] * weight[i];
        sg += gh;
        sgx += gh * (x[base + i] - mean) * inv;
    }
    const float mean_g = block_sum(sg, scratch) / width, mean_gx = block_sum(sgx, scratch) / width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float xh = (x[base + i] - mean) * inv;
        dx[base + i] = inv * (dy[base + i] * weight[i] - mean_g - xh * mean_gx);
    }
}
