// Row and token kernels of the ViT graph: patch extraction and the embeddings' assembly (and the patch rows of
// its gradient), token selection and its backward, L2 normalisation and its backward, the router's reduction
// over tokens and its backward, the mean and the f64 sums over rows, scaling and copies. Small and
// memory-bound: grid-stride loops or one warp per row.

#include "common.cuh"

#define FOR_EACH(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// pixels [B, C, S, S] to patch rows [B·grid², C·P·P] in the conv weight's (c, ky, kx) order.
extern "C" __global__ void patch_rows(const float* __restrict__ pixels, float* __restrict__ rows, int batch,
                                      int channels, int image, int patch) {
    const int grid = image / patch, patch_len = channels * patch * patch;
    const size_t n = (size_t)batch * grid * grid * patch_len;
    FOR_EACH(e, n) {
        const size_t row = e / patch_len;
        const int col = e % patch_len;
        const int b = row / (grid * grid), idx = row % (grid * grid), py = idx / grid, px = idx % grid;
        const int ch = col / (patch * patch), ky = (col / patch) % patch, kx = col % patch;
        rows[e] = pixels[(((size_t)b * channels + ch) * image + py * patch + ky) * image + px * patch + kx];
    }
}

// out [B, N, D]: token 0 the class embedding, token t ≥ 1 the patch embedding t−1, plus the position embedding.
extern "C" __global__ void assemble_tokens(const float* __restrict__ patches, const float* __restrict__ class_embedding,
                                           const float* __restrict__ position, float* __restrict__ out, int batch,
                                           int tokens, int width) {
    FOR_EACH(e, (size_t)batch * tokens * width) {
        const int d = e % width, t = (e / width) % tokens;
        const size_t b = e / ((size_t)width * tokens);
        const float v = t == 0 ? class_embedding[d] : patches[(b * (tokens - 1) + t - 1) * width + d];
        out[e] = v + position[(size_t)t * width + d];
    }
}

// out [B, D] = x[:, index, :] of x [B, N, D].
extern "C" __global__ void select_token(const float* __restrict__ x, float* __restrict__ out, int batch, int tokens,
                                        int width, int index) {
    FOR_EACH(e, (size_t)batch * width) {
        const size_t b = e / width;
        out[e] = x[(b * tokens + index) * width + e % width];
    }
}

// dx [B, N, D]: dy [B, D] at token `index`, zero elsewhere.
extern "C" __global__ void select_token_backward(const float* __restrict__ dy, float* __restrict__ dx, int batch,
                                                 int tokens, int width, int index) {
    FOR_EACH(e, (size_t)batch * tokens * width) {
        const int t = (e / width) % tokens;
        const size_t b = e / ((size_t)width * tokens);
        dx[e] = t == index ? dy[b * width + e % width] : 0.0f;
    }
}

// y = x·factor.
extern "C" __global__ void scale_values(const float* __restrict__ x, float* __restrict__ y, int n, float factor) {
    FOR_EACH(e, n) y[e] = x[e] * factor;
}

// y = x.
extern "C" __global__ void copy_values(const float* __restrict__ x, float* __restrict__ y, int n) {
    FOR_EACH(e, n) y[e] = x[e];
}

// out [1, W]: the mean of x [rows, W] over rows, one thread per column, rows in order.
extern "C" __global__ void mean_rows(const float* __restrict__ x, float* __restrict__ out, int rows, int width) {
    FOR_EACH(c, width) {
        float s = 0.0f;
        for (int r = 0; r < rows; ++r) s += x[(size_t)r * width + c];
        out[c] = s / rows;
    }
}

// out [W] = Σ_r x[r, :] over `rows` rows of x [rows, W], summed in f64 in row order, one thread per column:
// the last pass of every split f64 reduction (kernels/common.cuh `store_split`), and the position embedding's
// gradient (the tokens' gradient summed over samples).
extern "C" __global__ void column_sums(const float* __restrict__ x, float* __restrict__ out, int rows, int width) {
    FOR_EACH(c, width) {
        double s = 0.0;
        for (int r = 0; r < rows; ++r) s += x[(size_t)r * width + c];
        out[c] = (float)s;
    }
}

// out [B·(N−1), D]: the patch tokens' rows of x [B, N, D] (every token but the class token), for the patch
// embedding's weight gradient.
extern "C" __global__ void patch_token_rows(const float* __restrict__ x, float* __restrict__ out, int batch, int tokens,
                                            int width) {
    FOR_EACH(e, (size_t)batch * (tokens - 1) * width) {
        const size_t row = e / width, b = row / (tokens - 1), t = row % (tokens - 1) + 1;
        out[e] = x[(b * tokens + t) * width + e % width];
    }
}

// The squared norm of one row, by one warp.
static __device__ float row_norm(const float* row, int width) {
    float s = 0.0f;
    for (int c = threadIdx.x % 32; c < width; c += 32) s = fmaf(row[c], row[c], s);
    return fmaxf(sqrtf(warp_sum(s)), 1e-12f);
}

// y = x/|x| per row of `width`, one warp per row. Grid (⌈rows/8⌉), 256 threads.
extern "C" __global__ void l2_normalize(const float* __restrict__ x, float* __restrict__ y, int rows, int width) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * width;
    const float norm = row_norm(xr, width);
    for (int c = threadIdx.x % 32; c < width; c += 32) y[(size_t)row * width + c] = xr[c] / norm;
}

// dx = (dy − y·(y·dy))/|x| per row. Grid (⌈rows/8⌉), 256 threads.
extern "C" __global__ void l2_normalize_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                                 float* __restrict__ dx, int rows, int width) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * width;
    const float* g = dy + (size_t)row * width;
    const float norm = row_norm(xr, width);
    float dot = 0.0f;
    for (int c = threadIdx.x % 32; c < width; c += 32) dot = fmaf(xr[c] / norm, g[c], dot);
    dot = warp_sum(dot);
    for (int c = threadIdx.x % 32; c < width; c += 32) dx[(size_t)row * width + c] = (g[c] - xr[c] / norm * dot) / norm;
}

// The router's reduction from per-token outputs logits [B, N, T] (T ≤ 32): softmax over experts or identity,
// mean over tokens: w [B, T]. One block per sample, a warp per token, lane t for expert t. Grid (B), 256 threads.
extern "C" __global__ void router_reduce(const float* __restrict__ logits, float* __restrict__ w, int tokens,
                                         int experts, int softmax) {
    __shared__ float sums[8][32];
    const int b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float acc = 0.0f;
    for (int n = warp; n < tokens; n += 8) {
        const float l = lane < experts ? logits[((size_t)b * tokens + n) * experts + lane] : 0.0f;
        const float v = router_activation(l, experts, softmax);
        if (lane < experts) acc += v;
    }
    write_token_mean(acc, sums, 8, w, b, experts, tokens);
}

// dlogits [B, N, T] from dw [B, T]: dw/N, through the softmax when it was used. Grid (B), 256 threads.
extern "C" __global__ void router_reduce_backward(const float* __restrict__ logits, const float* __restrict__ dw,
                                                  float* __restrict__ dlogits, int tokens, int experts, int softmax) {
    const int b = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float g = lane < experts ? dw[(size_t)b * experts + lane] / tokens : 0.0f;
    for (int n = warp; n < tokens; n += 8) {
        const size_t at = ((size_t)b * tokens + n) * experts + lane;
        const float d = router_activation_backward(lane < experts ? logits[at] : 0.0f, g, experts, softmax);
        if (lane < experts) dlogits[at] = d;
    }
}
