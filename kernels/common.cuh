// Device helpers shared by the kernels. Compiled by NVRTC for the GPU and, through host/cuda_host.h, as
// plain C++ for the emulated tests.
#pragma once

#ifndef INFINITY  // NVRTC has no <cmath>; the host build takes it from there
#define INFINITY __int_as_float(0x7f800000)
#endif

// Activation codes, as src/cuda/ops.rs passes them (`act_code`).
#define ACT_NONE 0
#define ACT_QUICK_GELU 1
#define ACT_GELU 2
#define ACT_GELU_TANH 3
#define ACT_RELU 4

static __device__ __forceinline__ float activate(float z, int act) {
    switch (act) {
        case ACT_QUICK_GELU: return z / (1.0f + expf(-1.702f * z));
        case ACT_GELU: return 0.5f * z * (1.0f + erff(z * 0.70710678f));
        case ACT_GELU_TANH: return 0.5f * z * (1.0f + tanhf(0.7978846f * (z + 0.044715f * z * z * z)));
        case ACT_RELU: return fmaxf(z, 0.0f);
        default: return z;
    }
}

static __device__ __forceinline__ float activation_derivative(float z, int act) {
    switch (act) {
        case ACT_QUICK_GELU: {
            float s = 1.0f / (1.0f + expf(-1.702f * z));
            return s + 1.702f * z * s * (1.0f - s);
        }
        case ACT_GELU: {
            float cdf = 0.5f * (1.0f + erff(z * 0.70710678f));
            return cdf + z * expf(-0.5f * z * z) * 0.39894228f;
        }
        case ACT_GELU_TANH: {
            float t = tanhf(0.7978846f * (z + 0.044715f * z * z * z));
            return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * 0.7978846f * (1.0f + 3.0f * 0.044715f * z * z);
        }
        case ACT_RELU: return z > 0.0f ? 1.0f : 0.0f;
        default: return 1.0f;
    }
}

// Sum over a warp; every lane gets the total. In f32, or in f64 (T = double) for reductions whose result must
// not depend on the order of f32 roundings.
template <typename T>
static __device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

static __device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over a block of at most 1024 threads whose size is a multiple of 32; every thread gets the total.
// `scratch` holds 32 values of shared memory, free on entry and on return.
template <typename T>
static __device__ T block_sum(T v, T* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[w];  // the same order in every thread: one value
    __syncthreads();
    return total;
}

// An f64 partial sum leaves a kernel as two floats, `hi` its rounding and `lo` the rest, whose sum holds it
// to about 2^-48 relative: the buffers are f32, the precision of the sum is kept (`column_sums` adds them).
static __device__ __forceinline__ void store_split(double v, float* hi, float* lo) {
    const float h = (float)v;
    *hi = h;
    *lo = (float)(v - (double)h);
}

// The router's activation for the expert in this lane (lanes 0..experts−1 of a warp hold one token's
// outputs): softmax over those lanes, or identity. Every lane must call it (warp reductions).
static __device__ __forceinline__ float router_activation(float v, int experts, int softmax) {
    if (!softmax) return v;
    const int lane = threadIdx.x % 32;
    const float m = warp_max(lane < experts ? v : -INFINITY);
    const float e = lane < experts ? expf(v - m) : 0.0f;
    return e / warp_sum(e);
}

// Its backward: g for identity; p∘(g − Σ_t p·g) through the softmax, p recomputed from the output v.
static __device__ __forceinline__ float router_activation_backward(float v, float g, int experts, int softmax) {
    if (!softmax) return g;
    const float p = router_activation(v, experts, 1);
    return p * (g - warp_sum(p * g));
}

// w[b, t] = (Σ_warps sums[warp][t]) / tokens for a block of `warps` warps, each lane t having put its running
// sum in sums[warp][t]; warps in a fixed order.
static __device__ __forceinline__ void write_token_mean(float acc, float (*sums)[32], int warps, float* w, int b,
                                                        int experts, int tokens) {
    sums[threadIdx.x / 32][threadIdx.x % 32] = acc;
    __syncthreads();
    if (threadIdx.x < experts) {
        float s = 0.0f;
        for (int k = 0; k < warps; ++k) s += sums[k][threadIdx.x];
        w[(size_t)b * experts + threadIdx.x] = s / tokens;
    }
}

// Tensor-core operands (sm_80 and later) for the forward's `--precision tf32|bf16`. A 32-bit register holds
// one TF32 operand or two bf16 ones (the lower-indexed element in the low half), and `mma` is the warp-wide
// D += A·B of mma.sync.m16n8k8 (TF32) or m16n8k16 (bf16): A 16×k row-major, B k×8 column-major, f32
// accumulators. Counted in registers the two fragment layouts are the same (a0 (g, t), a1 (g+8, t),
// a2 (g, t+4), a3 (g+8, t+4); b0 (t, g), b1 (t+4, g); g = lane / 4, t = lane % 4), which lets one kernel
// serve both. `pack` rounds as the hardware's cvt does: TF32 to nearest with ties away (cvt.rna), bf16 to
// nearest even (cvt.rn). The host emulation implements `mma` in kernels/host/.
#if defined(__CUDACC__)
// d += a·b by one warp-wide mma.sync of `shape_and_types`, the accumulators in place.
#define MMA_SYNC(shape_and_types, d, a, b)                                                                 \
    asm volatile("mma.sync.aligned." shape_and_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                           \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
struct Tf32Operands {
    static constexpr int per_register = 1;
    static __device__ __forceinline__ unsigned pack(const float* v) {
        unsigned r;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v[0]));
        return r;
    }
    static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], const unsigned b[2]) {
        MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
    }
};
struct Bf16Operands {
    static constexpr int per_register = 2;
    static __device__ __forceinline__ unsigned pack(const float* v) {
        unsigned r;  // cvt.rn.bf16x2.f32 d, a, b puts a in the high half
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(v[1]), "f"(v[0]));
        return r;
    }
    static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], const unsigned b[2]) {
        MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
    }
};
#else
struct Tf32Operands {
    static constexpr int per_register = 1;
    static unsigned pack(const float* v) {
        uint32_t bits;
        std::memcpy(&bits, v, 4);
        if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;  // finite: round 13 bits
        return bits;
    }
    static void mma(float d[4], const unsigned a[4], const unsigned b[2], int site = __builtin_LINE()) {
        cuda_host::mma_m16n8(d, a, b, per_register, site);
    }
};
struct Bf16Operands {
    static constexpr int per_register = 2;
    static uint32_t to_bf16(float x) {
        uint32_t bits;
        std::memcpy(&bits, &x, 4);
        if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;     // NaN stays NaN
        return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest, ties to even
    }
    static unsigned pack(const float* v) { return to_bf16(v[0]) | (to_bf16(v[1]) << 16); }
    static void mma(float d[4], const unsigned a[4], const unsigned b[2], int site = __builtin_LINE()) {
        cuda_host::mma_m16n8(d, a, b, per_register, site);
    }
};
#endif

// Asynchronous copies from global to shared memory (cp.async, sm_80 and later). `copy_async_16` copies 4
// floats (both addresses 16-byte aligned), of which the first `valid` come from `global` and the rest are
// zero; `copy_async_4` copies one float, or a zero. Each thread's copies form groups (`copy_async_commit`);
// `copy_async_wait<P>` returns once at most the newest P of its groups are still in flight, and only then are
// that thread's copies visible to it (to other threads after a barrier as well). The host emulation lands a
// thread's copies either at that wait or at once (kernels/host/), so a read that misses its wait and a copy
// that overwrites data still being read both show up as wrong results.
#if defined(__CUDACC__)
static __device__ __forceinline__ unsigned shared_address(const float* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
static __device__ __forceinline__ void copy_async_16(float* shared, const float* global, int valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(shared)), "l"(global),
                 "r"(4 * valid)
                 : "memory");
}
static __device__ __forceinline__ void copy_async_4(float* shared, const float* global, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(shared)), "l"(global),
                 "r"(valid ? 4 : 0)
                 : "memory");
}
static __device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>
static __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
}
#else
static void copy_async_16(float* shared, const float* global, int valid) {
    cuda_host::copy_async(shared, global, 16, 4 * valid);
}
static void copy_async_4(float* shared, const float* global, bool valid) {
    cuda_host::copy_async(shared, global, 4, valid ? 4 : 0);
}
static void copy_async_commit() { cuda_host::copy_async_commit(); }
template <int PENDING>
static void copy_async_wait() {
    cuda_host::copy_async_wait(PENDING);
}
#endif

// Whether a pointer is 16-byte aligned (a 16-byte copy's requirement).
static __device__ __forceinline__ bool aligned16(const float* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Copies the piece (row, col..col+3) of a row-major matrix `m` of `rows` rows and `ld` columns into `slot`
// (16-byte aligned) asynchronously: the part inside the matrix, zeros for the rest. `vector`: the matrix's
// rows start 16-byte aligned (one 16-byte copy); otherwise four 4-byte ones.
static __device__ __forceinline__ void copy_piece_async(float* slot, const float* m, int row, int col, int rows,
                                                        int ld, bool vector) {
    const int valid = row < rows ? max(0, min(4, ld - col)) : 0;
    const float* from = valid > 0 ? m + (size_t)row * ld + col : m;  // an address even when nothing is read
    if (vector) {
        copy_async_16(slot, from, valid);
    } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) copy_async_4(slot + q, q < valid ? from + q : m, q < valid);
    }
}

// Loads one route's coefficients c[route, 0..experts) into shared memory `out`.
static __device__ __forceinline__ void load_coefficients(const float* __restrict__ coeff, int route, int experts,
                                                         float* out) {
    for (int t = threadIdx.x; t < experts; t += blockDim.x) out[t] = coeff[(size_t)route * experts + t];
    __syncthreads();
}
