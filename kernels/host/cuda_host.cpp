// The fiber scheduler behind cuda_host.h: one launch at a time per process (function-local statics stand
// for shared memory), each block's threads as ucontext fibers run round-robin until all have returned.

#include "cuda_host.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

namespace cuda_host {
namespace {

enum class Wait { None, Block, Warp };

// One cp.async in flight: its bytes were read at issue (global memory is read-only while a kernel runs).
struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
    int size;
};

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;  // uninitialised: only the fiber's own frames touch it
    uint3 index;
    unsigned linear = 0;
    Wait wait = Wait::None;
    int site = 0;  // the source line of the barrier it waits at
    bool done = false;
    std::vector<AsyncCopy> open;              // copies not yet committed
    std::deque<std::vector<AsyncCopy>> groups;  // committed, not yet landed; oldest first
};

constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMmaFloats = 16 * 16 + 16 * 8 + 16 * 8;  // A 16×16, B 16×8, C 16×8

struct Launch {
    dim3 grid, block;
    CopyLanding landing = CopyLanding::AtWait;
    uint3 block_index;
    const std::function<void()>* body = nullptr;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> slots;  // 32 per warp
    std::vector<float> mma;       // per warp: A, B, C of an emulated mma.sync
    Fiber* current = nullptr;
    ucontext_t scheduler;
};

Launch* g_launch = nullptr;
std::mutex g_mutex;

void fiber_entry() {
    Launch& l = *g_launch;
    (*l.body)();
    l.current->done = true;
    // Returning resumes uc_link, the scheduler.
}

void park(Wait why, int site) {
    Launch& l = *g_launch;
    Fiber* me = l.current;
    me->wait = why;
    me->site = site;
    swapcontext(&me->context, &l.scheduler);
}

[[noreturn]] void die(const char* what) {
    Launch& l = *g_launch;
    std::fprintf(stderr,
                 "cuda_host: %s in block (%u,%u,%u) of a %ux%ux%u grid with %ux%ux%u threads\n", what,
                 l.block_index.x, l.block_index.y, l.block_index.z, l.grid.x, l.grid.y, l.grid.z, l.block.x,
                 l.block.y, l.block.z);
    std::abort();
}

// Runs one block to completion.
void run_block() {
    Launch& l = *g_launch;
    const unsigned n = unsigned(l.fibers.size());
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = l.fibers[i];
        f.done = false;
        f.wait = Wait::None;
        f.open.clear();  // shared memory is the next block's now: copies the last one never waited for are void
        f.groups.clear();
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &l.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    const unsigned warps = (n + 31) / 32;
    for (;;) {
        bool ran = false;
        for (unsigned i = 0; i < n; ++i) {
            Fiber& f = l.fibers[i];
            if (f.done || f.wait != Wait::None) continue;
            l.current = &f;
            swapcontext(&l.scheduler, &f.context);
            ran = true;
        }
        // Every live fiber is now parked at a barrier (or done). Release what is complete.
        unsigned live = 0, at_block = 0;
        for (auto& f : l.fibers) {
            if (f.done) continue;
            ++live;
            if (f.wait == Wait::Block) ++at_block;
        }
        if (live == 0) return;
        bool released = false;
        if (at_block == live) {
            int site = -1;
            for (auto& f : l.fibers) {
                if (f.done) continue;
                if (site >= 0 && f.site != site) die("__syncthreads reached at different lines by one block's threads");
                site = f.site;
            }
            for (auto& f : l.fibers)
                if (!f.done) f.wait = Wait::None;
            released = true;
        } else {
            for (unsigned w = 0; w < warps; ++w) {
                unsigned warp_live = 0, warp_waiting = 0;
                for (unsigned i = w * 32; i < n && i < w * 32 + 32; ++i) {
                    if (l.fibers[i].done) continue;
                    ++warp_live;
                    if (l.fibers[i].wait == Wait::Warp) ++warp_waiting;
                }
                if (warp_live > 0 && warp_waiting == warp_live) {
                    int site = -1;
                    for (unsigned i = w * 32; i < n && i < w * 32 + 32; ++i) {
                        if (l.fibers[i].done) continue;
                        if (site >= 0 && l.fibers[i].site != site)
                            die("a warp's lanes meet at different warp-level operations (divergent shuffle or __syncwarp)");
                        site = l.fibers[i].site;
                    }
                    for (unsigned i = w * 32; i < n && i < w * 32 + 32; ++i) l.fibers[i].wait = Wait::None;
                    released = true;
                }
            }
        }
        if (!ran && !released) die("deadlock: a barrier that not every live thread reaches");
    }
}

}  // namespace

const uint3& thread_idx() { return g_launch->current->index; }
const uint3& block_idx() { return g_launch->block_index; }
const dim3& block_dim() { return g_launch->block; }
const dim3& grid_dim() { return g_launch->grid; }
void sync_block(int site) { park(Wait::Block, site); }
void sync_warp(int site) { park(Wait::Warp, site); }
unsigned lane_id() { return g_launch->current->linear % 32; }
uint64_t* warp_slots() { return &g_launch->slots[(g_launch->current->linear / 32) * 32]; }

void mma_m16n8(float d[4], const uint32_t a[4], const uint32_t b[2], int per_register, int site) {
    float* area = &g_launch->mma[(g_launch->current->linear / 32) * kMmaFloats];
    const int k = 8 * per_register;  // 8 (TF32) or 16 (bf16)
    float *A = area, *B = area + 16 * 16, *C = area + 16 * 16 + 16 * 8;
    const unsigned lane = lane_id(), group = lane / 4, tig = lane % 4;
    // Element j of a register: the whole word (TF32), or its low or high half (bf16, widened exactly).
    auto element = [per_register](uint32_t word, int j) {
        const uint32_t bits = per_register == 1 ? word : (j == 0 ? word << 16 : word & 0xffff0000u);
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    };
    for (int j = 0; j < per_register; ++j) {
        const int col = per_register * tig + j, half = k / 2;
        // A 16×k row-major: a0 (g, col), a1 (g+8, col), a2 (g, col + k/2), a3 (g+8, col + k/2).
        A[group * k + col] = element(a[0], j);
        A[(group + 8) * k + col] = element(a[1], j);
        A[group * k + col + half] = element(a[2], j);
        A[(group + 8) * k + col + half] = element(a[3], j);
        // B k×8 (k × n): b0 (col, g), b1 (col + k/2, g).
        B[col * 8 + group] = element(b[0], j);
        B[(col + half) * 8 + group] = element(b[1], j);
    }
    // C/D 16×8: d_i at row g (+8 for i ≥ 2), column 2t + (i & 1).
    for (int i = 0; i < 4; ++i) C[(group + (i >= 2 ? 8 : 0)) * 8 + 2 * tig + (i & 1)] = d[i];
    sync_warp(site);
    for (int i = 0; i < 4; ++i) {
        const unsigned row = group + (i >= 2 ? 8 : 0), col = 2 * tig + (i & 1);
        float acc = C[row * 8 + col];
        for (int kk = 0; kk < k; ++kk) acc = std::fma(A[row * k + kk], B[kk * 8 + col], acc);
        d[i] = acc;
    }
    sync_warp(site);  // every lane has read before the area is written again
}

void copy_async(void* dst, const void* src, int size, int src_size) {
    if ((size != 4 && size != 16) || src_size < 0 || src_size > size) die("cp.async of an unsupported size");
    if (reinterpret_cast<uintptr_t>(dst) % size != 0 || (src_size > 0 && reinterpret_cast<uintptr_t>(src) % size != 0))
        die("cp.async with an address not aligned to its size");
    AsyncCopy c{dst, {}, size};
    std::memcpy(c.bytes, src, size_t(src_size));  // the rest stays zero
    if (g_launch->landing == CopyLanding::AtIssue) {
        std::memcpy(dst, c.bytes, size_t(size));
        return;
    }
    g_launch->current->open.push_back(c);
}

void copy_async_commit() {
    Fiber& f = *g_launch->current;
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

void copy_async_wait(int pending) {
    Fiber& f = *g_launch->current;
    while (f.groups.size() > size_t(pending)) {
        for (const AsyncCopy& c : f.groups.front()) std::memcpy(c.dst, c.bytes, size_t(c.size));
        f.groups.pop_front();
    }
}

void launch(dim3 grid, dim3 block, CopyLanding landing, const std::function<void()>& body) {
    std::lock_guard<std::mutex> lock(g_mutex);
    Launch l;
    l.grid = grid;
    l.block = block;
    l.landing = landing;
    l.body = &body;
    const unsigned n = block.x * block.y * block.z;
    l.fibers.resize(n);
    l.slots.assign(((n + 31) / 32) * 32, 0);
    l.mma.assign(((n + 31) / 32) * kMmaFloats, 0.0f);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = l.fibers[i];
        f.stack.reset(new char[kStackBytes]);
        f.linear = i;
        f.index = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    }
    g_launch = &l;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                l.block_index = uint3{x, y, z};
                run_block();
            }
    g_launch = nullptr;
}

}  // namespace cuda_host
