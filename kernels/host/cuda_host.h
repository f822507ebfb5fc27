// Host emulation of the CUDA C++ subset the kernels in kernels/*.cu use, so that the same sources compile
// as C++ and run in `cargo test` on machines without a GPU (build.rs compiles them with this header
// force-included). Blocks run one after another; a block's threads run as cooperative fibers on one OS
// thread, switching only at __syncthreads and warp-level operations, so a kernel that is correct under
// CUDA's rules gives the same result here, and a barrier that some threads never reach is reported as a
// deadlock instead of hanging.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace cuda_host {

// The block and thread indices of the fiber now running.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Park the calling fiber until every live thread of its block (or of its warp) arrives.
// `site` is the source line of the call: threads of one block (or warp) meeting at different barriers
// is undefined behaviour in CUDA, and reported here.
void sync_block(int site);
void sync_warp(int site);

// This thread's 8-byte exchange slot, shared with its warp for shuffles.
uint64_t* warp_slots();
unsigned lane_id();

// The warp-collective mma.sync.m16n8k8 on TF32 operands (`per_register` 1) or m16n8k16 on bf16 ones (2, the
// lower-indexed element in the low half), f32 accumulation, on the fragment layouts of the PTX ISA: every lane
// of the warp contributes its fragments and D, and receives its part of D + A·B.
void mma_m16n8(float d[4], const uint32_t a[4], const uint32_t b[2], int per_register, int site);

// cp.async: copy `size` bytes (4 or 16) to shared memory at `dst`, the first `src_size` of them from `src` and
// the rest zeros; commit this thread's copies so far as a group; wait until at most `pending` of its groups
// are in flight. Where a copy lands is the launch's `CopyLanding`.
void copy_async(void* dst, const void* src, int size, int src_size);
void copy_async_commit();
void copy_async_wait(int pending);

// When a thread's asynchronous copies reach shared memory: at the latest moment CUDA allows (the wait that
// covers them), which turns a read before that wait into a wrong result; or at once, which turns a copy
// into a buffer that other threads still read into one. A kernel must pass under both.
enum class CopyLanding : unsigned { AtWait = 0, AtIssue = 1 };

// Runs `body` for every thread of every block of the launch.
void launch(dim3 grid, dim3 block, CopyLanding landing, const std::function<void()>& body);

template <typename T>
T shuffle(T value, unsigned src_lane, int site) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    uint64_t* slots = warp_slots();
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    slots[lane_id()] = bits;
    sync_warp(site);
    T out;
    uint64_t theirs = slots[src_lane % 32];
    std::memcpy(&out, &theirs, sizeof(T));
    sync_warp(site);  // no lane may overwrite its slot before every lane has read
    return out;
}

}  // namespace cuda_host

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so a function-local static is exactly one block's shared memory.
#define __shared__ static

#define threadIdx (cuda_host::thread_idx())
#define blockIdx (cuda_host::block_idx())
#define blockDim (cuda_host::block_dim())
#define gridDim (cuda_host::grid_dim())

inline void __syncthreads(int site = __builtin_LINE()) { cuda_host::sync_block(site); }
inline void __syncwarp(unsigned = 0xffffffffu, int site = __builtin_LINE()) { cuda_host::sync_warp(site); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32, int site = __builtin_LINE()) {
    return cuda_host::shuffle(v, cuda_host::lane_id() ^ unsigned(mask), site);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32, int site = __builtin_LINE()) {
    unsigned src = cuda_host::lane_id() + delta;
    return cuda_host::shuffle(v, src < 32 ? src : cuda_host::lane_id(), site);
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32, int site = __builtin_LINE()) {
    return cuda_host::shuffle(v, unsigned(src), site);
}

// Fibers switch only at barriers, so a read-modify-write is atomic here.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}

// expf, logf, sqrtf, fmaxf, fminf and fmaf come from <cmath> as they are.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
// A rounded product and sum that no compiler may fuse into one fma: NVRTC fuses `a*b + c` by default, and so
// may the host compiler for a target with FMA (aarch64).
inline float __fmul_rn(float a, float b) {
    volatile float p = a * b;
    return p;
}
inline float __fadd_rn(float a, float b) {
    volatile float s = a + b;
    return s;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
