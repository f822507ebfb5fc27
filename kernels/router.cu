// The WEMoE router's head and reduction: from the router's last hidden layer h [B·N, H] (the layer_norm2
// output itself for a depth-1 router), logits = h·W2ᵀ + b2 per token, then identity or softmax over the
// experts, then the mean over each sample's tokens: w [B, T]. One block per sample, one warp per token at
// a time, lane t holding expert t (T ≤ 32), so the logits never leave the chip unless backward needs them.

#include "common.cuh"

#define ROUTER_THREADS 256
#define ROUTER_WARPS (ROUTER_THREADS / 32)

// h [B·N, H], w2 [T, H], b2 [T]; writes w [B, T] and, when not null, logits [B·N, T]. Grid (B), 256 threads.
extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
    router_head_forward(const float* __restrict__ h, const float* __restrict__ w2, const float* __restrict__ b2,
                        float* __restrict__ logits, float* __restrict__ w, int tokens, int hidden, int experts,
                        int softmax) {
    __shared__ float sums[ROUTER_WARPS][32];
    const int b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float acc = 0.0f;
    for (int n = warp; n < tokens; n += ROUTER_WARPS) {
        const float* row = h + ((size_t)b * tokens + n) * hidden;
        float mine = 0.0f;
        for (int t = 0; t < experts; ++t) {
            float dot = 0.0f;
            for (int k = lane; k < hidden; k += 32) dot = fmaf(row[k], w2[(size_t)t * hidden + k], dot);
            dot = warp_sum(dot) + b2[t];
            if (lane == t) mine = dot;
        }
        if (logits && lane < experts) logits[((size_t)b * tokens + n) * experts + lane] = mine;
        const float v = router_activation(mine, experts, softmax);
        if (lane < experts) acc += v;
    }
    write_token_mean(acc, sums, ROUTER_WARPS, w, b, experts, tokens);
}

// Backward of router_head_forward from dw [B, T]: dlogits [B·N, T] and dh [B·N, H] = dlogits·W2.
// logits as the forward wrote them. Grid (B), 256 threads.
extern "C" __global__ void __launch_bounds__(ROUTER_THREADS)
    router_head_backward(const float* __restrict__ logits, const float* __restrict__ w2,
                         const float* __restrict__ dw, float* __restrict__ dlogits, float* __restrict__ dh,
                         int tokens, int hidden, int experts, int softmax) {
    __shared__ float token_dlogits[ROUTER_WARPS][32];
    const int b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float g = lane < experts ? dw[(size_t)b * experts + lane] / tokens : 0.0f;
    for (int n = warp; n < tokens; n += ROUTER_WARPS) {
        const size_t token = (size_t)b * tokens + n;
        const float l = lane < experts ? logits[token * experts + lane] : 0.0f;
        const float d = router_activation_backward(l, g, experts, softmax);
        if (lane < experts) dlogits[token * experts + lane] = d;
        // Through shared memory, not shuffles: the loop below is divergent when H is not a multiple of 32.
        token_dlogits[warp][lane] = d;
        __syncwarp();
        for (int k = lane; k < hidden; k += 32) {
            float s = 0.0f;
            for (int t = 0; t < experts; ++t) s = fmaf(token_dlogits[warp][t], w2[(size_t)t * hidden + k], s);
            dh[token * hidden + k] = s;
        }
        __syncwarp();  // every lane has read before the next token overwrites
    }
}

// Batch routing: the mean of w [B, T] over consecutive groups of `group` samples (the last may be
// smaller): out [⌈B/group⌉, T]. One thread per output.
extern "C" __global__ void group_mean(const float* __restrict__ w, float* __restrict__ out, int batch, int group,
                                      int experts) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, groups = (batch + group - 1) / group;
    if (i >= groups * experts) return;
    const int gi = i / experts, t = i % experts, first = gi * group, last = min(batch, first + group);
    float s = 0.0f;
    for (int b = first; b < last; ++b) s += w[(size_t)b * experts + t];
    out[i] = s / (last - first);
}
