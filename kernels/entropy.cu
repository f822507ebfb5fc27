// The adaptation loss: the mean over rows of the Shannon entropy of softmax(logits), with its gradient
// −p∘(log p + H)/rows, one warp per row (log-softmax in f32 with the row maximum subtracted).

#include "common.cuh"

// logits, dlogits [rows, classes]; entropy [rows] (each row's H, summed by the caller in f64).
// Grid (⌈rows/8⌉), 256 threads.
extern "C" __global__ void softmax_entropy(const float* __restrict__ logits, float* __restrict__ entropy,
                                           float* __restrict__ dlogits, int rows, int classes) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together
    const float* l = logits + (size_t)row * classes;
    float m = -INFINITY;
    for (int c = lane; c < classes; c += 32) m = fmaxf(m, l[c]);
    m = warp_max(m);
    float z = 0.0f;
    for (int c = lane; c < classes; c += 32) z += expf(l[c] - m);
    const float log_z = logf(warp_sum(z));
    float h = 0.0f;
    for (int c = lane; c < classes; c += 32) {
        const float lp = l[c] - m - log_z;
        h -= expf(lp) * lp;
    }
    h = warp_sum(h);
    if (lane == 0) entropy[row] = h;
    for (int c = lane; c < classes; c += 32) {
        const float lp = l[c] - m - log_z;
        dlogits[(size_t)row * classes + c] = -expf(lp) * (lp + h) / rows;
    }
}
