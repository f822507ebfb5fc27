// A check of the host emulation's cp.async, not a kernel the engine runs: each thread copies one float into
// shared memory asynchronously and records what it reads there before and after its wait. On a GPU the
// first read is indeterminate; the emulation must show the old value when copies land at the wait and the
// new one when they land at issue (tests/kernels.rs), or its landings could hide a kernel's missing wait.

// needs sm_80: cp.async

#include "common.cuh"

// src [n], before_wait [n], after_wait [n]; one block of n ≤ 256 threads.
extern "C" __global__ void copy_async_probe(const float* __restrict__ src, float* __restrict__ before_wait,
                                            float* __restrict__ after_wait, int n) {
    __shared__ __align__(16) float staged[256];
    const int i = threadIdx.x;
    if (i >= n) return;
    staged[i] = -1.0f;  // each thread touches only its own element: no barrier needed
    copy_async_4(&staged[i], &src[i], true);
    copy_async_commit();
    before_wait[i] = staged[i];
    copy_async_wait<0>();
    after_wait[i] = staged[i];
}
