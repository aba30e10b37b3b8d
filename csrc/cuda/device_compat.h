// The few device primitives the pool-score kernels use, with two implementations:
//
//  * CUDA (compiled by nvcc): threadIdx/blockIdx, __syncthreads, __shfl_*_sync, atomics, streaming
//    loads (ld.global.cs: every logit is read once);
//  * host emulation (any other compiler; used by csrc/cuda/emu/emu_main.cpp): every CUDA thread of
//    a block is a fiber; __syncthreads and the two halves of a shuffle are barriers at which a fiber
//    yields to a scheduler that releases the barrier once all the threads it concerns (block or
//    warp) have arrived. It runs the very same kernel source on a machine without a GPU, so every
//    index computation, barrier and shuffle of the kernels is executed by the CPU test suite. A
//    barrier or shuffle reached by only part of its block/warp is reported as a deadlock; a missing
//    __syncthreads gives wrong results deterministically (each fiber runs to its next barrier in
//    turn, in an order the scheduler shuffles).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)

#define FB_DEV __device__ __forceinline__
#define FB_UNROLL _Pragma("unroll")

namespace fastbald {
namespace cuda {
namespace dev {

FB_DEV int tid() { return static_cast<int>(threadIdx.x); }
FB_DEV int bdim() { return static_cast<int>(blockDim.x); }
FB_DEV int64_t bid() { return static_cast<int64_t>(blockIdx.x); }
FB_DEV int64_t gdim() { return static_cast<int64_t>(gridDim.x); }
FB_DEV void sync() { __syncthreads(); }

template <class T>
FB_DEV T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
template <class T>
FB_DEV T shfl(T v, int src_lane) {
  return __shfl_sync(0xffffffffu, v, src_lane);
}

// Bit l set when lane l's p is true; every lane of the warp must call it.
FB_DEV unsigned ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
// Max / min of an unsigned over the warp (one REDUX instruction, sm_80+); every lane must call it.
FB_DEV unsigned warp_max_u32(unsigned v) { return __reduce_max_sync(0xffffffffu, v); }
FB_DEV unsigned warp_min_u32(unsigned v) { return __reduce_min_sync(0xffffffffu, v); }

FB_DEV void atomic_add_shared(int* p, int v) { atomicAdd(p, v); }
FB_DEV void atomic_max_global(unsigned long long* p, unsigned long long v) { atomicMax(p, v); }

// One element, read once (streaming, evict-first).
template <class S>
FB_DEV S load_elem(const S* p) {
  S v;
  if constexpr (sizeof(S) == 2) {
    const unsigned short r = __ldcs(reinterpret_cast<const unsigned short*>(p));
    memcpy(&v, &r, 2);
  } else if constexpr (sizeof(S) == 4) {
    const unsigned int r = __ldcs(reinterpret_cast<const unsigned int*>(p));
    memcpy(&v, &r, 4);
  } else {
    static_assert(sizeof(S) == 8, "element size");
    const unsigned long long r = __ldcs(reinterpret_cast<const unsigned long long*>(p));
    memcpy(&v, &r, 8);
  }
  return v;
}

// 16 bytes from a 16-byte aligned address.
FB_DEV void load16(const void* p, void* dst) {
  const uint4 r = __ldcs(reinterpret_cast<const uint4*>(p));
  memcpy(dst, &r, 16);
}
// 8 bytes from an 8-byte aligned address.
FB_DEV void load8(const void* p, void* dst) {
  const uint2 r = __ldcs(reinterpret_cast<const uint2*>(p));
  memcpy(dst, &r, 8);
}

}  // namespace dev
}  // namespace cuda
}  // namespace fastbald

#else  // host emulation

#include <ucontext.h>

#include <atomic>
#include <vector>

#define FB_DEV inline
#define FB_UNROLL

namespace fastbald {
namespace cuda {
namespace dev {

// Cooperative emulation of one CUDA block: every CUDA thread is a fiber (ucontext) that runs until
// it reaches a barrier (__syncthreads, or one of the two halves of a warp shuffle), then hands
// control back to the scheduler (emu/scheduler.h), which releases a barrier once every thread it
// concerns has arrived and reports a deadlock (a divergent barrier or shuffle) otherwise.
enum WaitKind : int { kRunning = 0, kWaitBlock = 1, kWaitWarp = 2, kDone = 3 };

struct EmuThread {
  ucontext_t ctx;
  int state = kRunning;
  std::vector<char> stack;
};

struct EmuBlock {
  int bdim = 0;
  int64_t gdim = 0;
  int64_t bid = 0;
  int cur = 0;  // the fiber running now
  ucontext_t sched;
  std::vector<EmuThread> threads;
  std::vector<uint64_t> shfl_buf;  // [warp][32]
};

inline EmuBlock* g_blk = nullptr;

inline int tid() { return g_blk->cur; }
inline int bdim() { return g_blk->bdim; }
inline int64_t bid() { return g_blk->bid; }
inline int64_t gdim() { return g_blk->gdim; }

inline void wait_at(int kind) {
  EmuThread& t = g_blk->threads[g_blk->cur];
  t.state = kind;
  swapcontext(&t.ctx, &g_blk->sched);
}
inline void sync() { wait_at(kWaitBlock); }

template <class T>
inline T shfl_from(T v, int src_lane_xor, bool is_xor) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int me = g_blk->cur, w = me / 32, l = me % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_blk->shfl_buf[static_cast<size_t>(w) * 32 + l] = bits;
  wait_at(kWaitWarp);
  const int src = is_xor ? (l ^ src_lane_xor) : src_lane_xor;
  const uint64_t o = g_blk->shfl_buf[static_cast<size_t>(w) * 32 + src];
  wait_at(kWaitWarp);
  T r;
  std::memcpy(&r, &o, sizeof(T));
  return r;
}
template <class T>
inline T shfl_xor(T v, int lane_mask) {
  return shfl_from(v, lane_mask, true);
}
template <class T>
inline T shfl(T v, int src_lane) {
  return shfl_from(v, src_lane, false);
}

inline unsigned ballot(bool p) {
  const int me = g_blk->cur, w = me / 32, l = me % 32;
  g_blk->shfl_buf[static_cast<size_t>(w) * 32 + l] = p ? 1 : 0;
  wait_at(kWaitWarp);
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= static_cast<unsigned>(g_blk->shfl_buf[static_cast<size_t>(w) * 32 + i] != 0) << i;
  wait_at(kWaitWarp);
  return r;
}

inline unsigned warp_reduce_u32(unsigned v, bool is_max) {
  const int me = g_blk->cur, w = me / 32, l = me % 32;
  g_blk->shfl_buf[static_cast<size_t>(w) * 32 + l] = v;
  wait_at(kWaitWarp);
  unsigned r = static_cast<unsigned>(g_blk->shfl_buf[static_cast<size_t>(w) * 32]);
  for (int i = 1; i < 32; ++i) {
    const unsigned u = static_cast<unsigned>(g_blk->shfl_buf[static_cast<size_t>(w) * 32 + i]);
    r = is_max ? (u > r ? u : r) : (u < r ? u : r);
  }
  wait_at(kWaitWarp);
  return r;
}
inline unsigned warp_max_u32(unsigned v) { return warp_reduce_u32(v, true); }
inline unsigned warp_min_u32(unsigned v) { return warp_reduce_u32(v, false); }

inline void atomic_add_shared(int* p, int v) { std::atomic_ref<int>(*p).fetch_add(v); }
inline void atomic_max_global(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {
  }
}

template <class S>
inline S load_elem(const S* p) {
  return *p;
}
inline void load16(const void* p, void* dst) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) __builtin_trap();  // the kernels must align
  std::memcpy(dst, p, 16);
}
inline void load8(const void* p, void* dst) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) __builtin_trap();
  std::memcpy(dst, p, 8);
}

}  // namespace dev
}  // namespace cuda
}  // namespace fastbald

#endif
