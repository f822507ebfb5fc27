// LayerNorm over the last axis: one block per row, statistics by block reductions (mean first, then the
// centred variance, as the CPU reference does), and its input gradient with frozen affine parameters.

#include "common.cuh"

#define LN_THREADS 256

static __device__ __forceinline__ float inverse_sqrt(float v) { return rsqrtf(v); }
static __device__ __forceinline__ double inverse_sqrt(double v) { return 1.0 / sqrt(v); }

// A row's mean and 1/σ (the centred variance, as the CPU reference computes it), summed in T by the block.
template <typename T>
static __device__ void row_statistics(const float* row, int width, float eps, T* scratch, T* mean, T* inv) {
    T s = 0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) s += row[i];
    const T m = block_sum(s, scratch) / width;
    T q = 0;
    for (int i = threadIdx.x; i < width; i += blockDim.x) q += (row[i] - m) * (row[i] - m);
    *mean = m;
    *inv = inverse_sqrt(block_sum(q, scratch) / width + (T)eps);
}

// x, y [rows, width]. Grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layer_norm_forward(const float* __restrict__ x, const float* __restrict__ weight,
                       const float* __restrict__ bias, float* __restrict__ y, int width, float eps) {
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * width;
    float mean, inv;
    row_statistics(row, width, eps, scratch, &mean, &inv);
    for (int i = threadIdx.x; i < width; i += blockDim.x)
        y[(size_t)blockIdx.x * width + i] = (row[i] - mean) * inv * weight[i] + bias[i];
}

// dx = (1/σ)(ĝ − mean(ĝ) − x̂·mean(ĝ∘x̂)), ĝ = dy∘weight. Grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layer_norm_backward(const float* __restrict__ x, const float* __restrict__ weight,
                        const float* __restrict__ dy, float* __restrict__ dx, int width, float eps) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * width;
    float mean, inv;
    row_statistics(x + base, width, eps, scratch, &mean, &inv);
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

// The affine parameters' gradients (AdaMerging trains every parameter): dweight = Σ_rows dy∘x̂ and
// dbias = Σ_rows dy, in f64 as the CPU reference sums them, never by atomics (the same bits every run). First
// each row's statistics, then partial sums over chunks of LN_CHUNK rows, which `column_sums` adds in order.

#define LN_CHUNK 256

// stats [rows, 3]: the mean split in two floats (hi, lo) and 1/σ, from f64 sums. Grid (rows), 256 threads.
extern "C" __global__ void __launch_bounds__(LN_THREADS)
    layer_norm_statistics(const float* __restrict__ x, float* __restrict__ stats, int width, float eps) {
    __shared__ double scratch[32];
    double mean, inv;
    row_statistics(x + (size_t)blockIdx.x * width, width, eps, scratch, &mean, &inv);
    if (threadIdx.x == 0) {
        float* out = stats + (size_t)blockIdx.x * 3;
        store_split(mean, out, out + 1);
        out[2] = (float)inv;
    }
}

// partial_weight, partial_bias [2·chunks, width]: chunk k's sums split into rows 2k (hi) and 2k+1 (lo).
// Grid (⌈width/32⌉, chunks), block (32, 8): a column per x-thread, the chunk's rows strided over the 8
// y-threads, whose sums are then added in a fixed order.
extern "C" __global__ void __launch_bounds__(256)
    layer_norm_param_grads(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ stats,
                           float* __restrict__ partial_weight, float* __restrict__ partial_bias, int rows, int width) {
    __shared__ double sums[2][8][32];
    const int c = blockIdx.x * 32 + threadIdx.x, first = blockIdx.y * LN_CHUNK;
    const int last = min(rows, first + LN_CHUNK);
    double gw = 0.0, gb = 0.0;
    if (c < width) {
        for (int r = first + threadIdx.y; r < last; r += 8) {
            const float* s = stats + (size_t)r * 3;
            const double g = dy[(size_t)r * width + c];
            const double xhat = ((double)x[(size_t)r * width + c] - ((double)s[0] + (double)s[1])) * (double)s[2];
            gw += g * xhat;
            gb += g;
        }
    }
    sums[0][threadIdx.y][threadIdx.x] = gw;
    sums[1][threadIdx.y][threadIdx.x] = gb;
    __syncthreads();
    if (threadIdx.y == 0 && c < width) {
        double tw = 0.0, tb = 0.0;
        for (int k = 0; k < 8; ++k) {
            tw += sums[0][k][threadIdx.x];
            tb += sums[1][k][threadIdx.x];
        }
        const size_t hi = (size_t)2 * blockIdx.y * width + c, lo = hi + width;
        store_split(tw, partial_weight + hi, partial_weight + lo);
        store_split(tb, partial_bias + hi, partial_bias + lo);
    }
}
