// Element-wise kernels: activations and their backward, residual adds, a product's bias and activation.
// Grid-stride loops.

#include "common.cuh"

#define FOR_EACH_ELEMENT(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// y = act(z).
extern "C" __global__ void activation_forward(const float* __restrict__ z, float* __restrict__ y, int n, int act) {
    FOR_EACH_ELEMENT(i, n) y[i] = activate(z[i], act);
}

// dz = dy ∘ act'(z).
extern "C" __global__ void activation_backward(const float* __restrict__ z, const float* __restrict__ dy,
                                               float* __restrict__ dz, int n, int act) {
    FOR_EACH_ELEMENT(i, n) dz[i] = dy[i] * activation_derivative(z[i], act);
}

// y += x.
extern "C" __global__ void add_in_place(float* __restrict__ y, const float* __restrict__ x, int n) {
    FOR_EACH_ELEMENT(i, n) y[i] += x[i];
}

// y [rows, width] = act(y + b) in place, b [width] (may be null): the epilogue of a dense product computed
// without one (cuBLAS's, src/device/cuda.rs).
extern "C" __global__ void bias_activation(float* __restrict__ y, const float* __restrict__ b, int rows, int width,
                                           int act) {
    FOR_EACH_ELEMENT(i, (size_t)rows * width) y[i] = activate(b ? y[i] + b[i % width] : y[i], act);
}
