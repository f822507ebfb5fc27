// One Adam step as torch.optim.Adam takes it (no weight decay, no amsgrad), in double like the CPU
// optimiser: p −= step_size·m / (√v / correction2 + eps), with step_size = lr/(1−β1^t) and
// correction2 = √(1−β2^t) computed on the host.

extern "C" __global__ void adam_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, int n, double beta1, double beta2, double step_size,
                                     double correction2, double eps) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x) {
        const double gi = g[i];
        const double mi = beta1 * m[i] + (1.0 - beta1) * gi;
        const double vi = beta2 * v[i] + (1.0 - beta2) * gi * gi;
        m[i] = (float)mi;
        v[i] = (float)vi;
        p[i] = (float)((double)p[i] - step_size * mi / (sqrt(vi) / correction2 + eps));
    }
}
