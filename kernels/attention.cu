// Multi-head scaled dot-product attention over q, k, v [B, N, D] with the heads splitting D (head h owns
// columns h·dh .. (h+1)·dh), and its backward. One warp per query row: its scores against every key stay in
// shared memory (so N ≤ ATT_MAX_TOKENS), the softmax is a warp reduction, and the output row is accumulated
// with the lanes over the head's columns. The backward runs per query row (dq, and the probabilities P and
// score gradients dS it writes), then per key row (dk, dv as column sums over the query rows, in a fixed
// order): no atomics, so results do not depend on scheduling.

#include "common.cuh"

#define ATT_THREADS 256
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_MAX_TOKENS 1024

// Scores of query row `i` against every key into `s` (shared), softmaxed; returns nothing, s holds P.
static __device__ void softmax_row(const float* __restrict__ q, const float* __restrict__ k, int tokens, int width,
                                   int head_dim, size_t sample, int head, int i, float scale, float* s) {
    const int lane = threadIdx.x % 32;
    const float* qi = q + (sample * tokens + i) * width + head * head_dim;
    for (int j = lane; j < tokens; j += 32) {
        const float* kj = k + (sample * tokens + j) * width + head * head_dim;
        float dot = 0.0f;
        for (int d = 0; d < head_dim; ++d) dot = fmaf(qi[d], kj[d], dot);
        s[j] = dot * scale;
    }
    __syncwarp();
    float m = -INFINITY;
    for (int j = lane; j < tokens; j += 32) m = fmaxf(m, s[j]);
    m = warp_max(m);
    float z = 0.0f;
    for (int j = lane; j < tokens; j += 32) {
        s[j] = expf(s[j] - m);
        z += s[j];
    }
    z = warp_sum(z);
    for (int j = lane; j < tokens; j += 32) s[j] /= z;
    __syncwarp();
}

// out [B, N, D]. Grid (⌈N/8⌉, heads, B), 256 threads.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_forward(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                      float* __restrict__ out, int tokens, int width, int heads) {
    __shared__ float scores[ATT_WARPS][ATT_MAX_TOKENS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * ATT_WARPS + warp, head = blockIdx.y, head_dim = width / heads;
    const size_t sample = blockIdx.z;
    if (i >= tokens) return;  // whole warps
    float* s = scores[warp];
    softmax_row(q, k, tokens, width, head_dim, sample, head, i, rsqrtf((float)head_dim), s);
    for (int d = lane; d < head_dim; d += 32) {
        float acc = 0.0f;
        for (int j = 0; j < tokens; ++j) acc = fmaf(s[j], v[(sample * tokens + j) * width + head * head_dim + d], acc);
        out[(sample * tokens + i) * width + head * head_dim + d] = acc;
    }
}

// Per query row i: P[i, :] and dS[i, j] = P[i, j]·(dP[i, j] − Σ_j' P[i, j']·dP[i, j']) with dP = dO·Vᵀ, written
// to p and ds [B, heads, N, N]; dq[i] = scale·Σ_j dS[i, j]·k[j]. Grid (⌈N/8⌉, heads, B), 256 threads.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_backward_rows(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                            const float* __restrict__ d_out, float* __restrict__ p, float* __restrict__ ds,
                            float* __restrict__ dq, int tokens, int width, int heads) {
    __shared__ float scores[ATT_WARPS][ATT_MAX_TOKENS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * ATT_WARPS + warp, head = blockIdx.y, head_dim = width / heads;
    const size_t sample = blockIdx.z;
    if (i >= tokens) return;
    const float scale = rsqrtf((float)head_dim);
    float* s = scores[warp];
    softmax_row(q, k, tokens, width, head_dim, sample, head, i, scale, s);
    const float* doi = d_out + (sample * tokens + i) * width + head * head_dim;
    const size_t row = ((sample * heads + head) * tokens + i) * tokens;
    float dot = 0.0f;
    for (int j = lane; j < tokens; j += 32) {
        const float* vj = v + (sample * tokens + j) * width + head * head_dim;
        float dp = 0.0f;
        for (int d = 0; d < head_dim; ++d) dp = fmaf(doi[d], vj[d], dp);
        ds[row + j] = dp;  // dP for now
        dot = fmaf(s[j], dp, dot);
    }
    dot = warp_sum(dot);
    for (int j = lane; j < tokens; j += 32) {
        p[row + j] = s[j];
        const float g = s[j] * (ds[row + j] - dot);
        ds[row + j] = g;
        s[j] = g;  // each lane rewrites only its own entries
    }
    __syncwarp();
    for (int d = lane; d < head_dim; d += 32) {
        float acc = 0.0f;
        for (int j = 0; j < tokens; ++j) acc = fmaf(s[j], k[(sample * tokens + j) * width + head * head_dim + d], acc);
        dq[(sample * tokens + i) * width + head * head_dim + d] = acc * scale;
    }
}

// Per key row j: dv[j] = Σ_i P[i, j]·dO[i] and dk[j] = scale·Σ_i dS[i, j]·q[i], from attention_backward_rows'
// p and ds. Grid (⌈N/8⌉, heads, B), 256 threads.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_backward_columns(const float* __restrict__ q, const float* __restrict__ d_out,
                               const float* __restrict__ p, const float* __restrict__ ds, float* __restrict__ dk,
                               float* __restrict__ dv, int tokens, int width, int heads) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * ATT_WARPS + warp, head = blockIdx.y, head_dim = width / heads;
    const size_t sample = blockIdx.z;
    if (j >= tokens) return;
    const float scale = rsqrtf((float)head_dim);
    const size_t block = (sample * heads + head) * tokens * tokens;
    for (int d = lane; d < head_dim; d += 32) {
        float gv = 0.0f, gk = 0.0f;
        for (int i = 0; i < tokens; ++i) {
            const size_t at = (sample * tokens + i) * width + head * head_dim + d;
            gv = fmaf(p[block + (size_t)i * tokens + j], d_out[at], gv);
            gk = fmaf(ds[block + (size_t)i * tokens + j], q[at], gk);
        }
        const size_t at = (sample * tokens + j) * width + head * head_dim + d;
        dv[at] = gv;
        dk[at] = gk * scale;
    }
}
