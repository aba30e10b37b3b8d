// The block scheduler of the CUDA-kernel emulators (emu_main.cpp: pool scores; batchbald_emu.cpp:
// BatchBALD), on the host half of ../device_compat.h.
//
// run_grid runs a kernel body on every block of a grid, one block after the other, each block's
// threads as fibers (ucontext) that yield at __syncthreads and at each half of a warp-level
// primitive (shuffle, ballot, REDUX). Shared memory is allocated at its exact size (under ASan a
// byte past it is a heap-buffer-overflow) and poisoned (all bits set: NaN / -1) before each block.
// The order in which ready fibers run is shuffled by the caller's seeded RNG, so code that reads
// another thread's shared data without a barrier gets different, wrong results. A barrier is
// released once all its threads (block or warp) have arrived; a barrier or shuffle not reached by
// all of its threads is reported as a deadlock (exit 3).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "../device_compat.h"

namespace fastbald {
namespace cuda {
namespace emu {

// `bytes` bytes (at least 1) at an `align`-byte boundary, with no slack after them.
inline unsigned char* exact_alloc(size_t bytes, size_t align) {
  void* p = nullptr;
  if (posix_memalign(&p, align, bytes > 0 ? bytes : 1) != 0) {
    std::fprintf(stderr, "emulator: out of memory (%zu bytes)\n", bytes);
    std::exit(4);
  }
  return static_cast<unsigned char*>(p);
}

struct Fiber {
  static void entry() {
    (*body)();
    dev::g_blk->threads[dev::g_blk->cur].state = dev::kDone;
    // returning switches to uc_link (the scheduler)
  }
  static inline std::function<void()>* body = nullptr;
};

// Kept out of line: getcontext returns twice, which the caller's loop variables must not see.
[[gnu::noinline]] inline void init_fiber(dev::EmuThread& t, ucontext_t* link, size_t stack) {
  t.stack.resize(stack);
  getcontext(&t.ctx);
  t.ctx.uc_stack.ss_sp = t.stack.data();
  t.ctx.uc_stack.ss_size = stack;
  t.ctx.uc_link = link;
  makecontext(&t.ctx, &Fiber::entry, 0);
  t.state = dev::kRunning;
}

// Runs kernel(smem) on blocks 0 .. grid - 1 of `block` threads (a multiple of 32) with
// `smem_bytes` of shared memory (16-byte aligned on the device; 128 here) and `stack` bytes of
// stack per thread. Warps whose 32 threads all wait at a warp-level primitive: between two block
// barriers the scheduler either releases a random non-empty subset of them each round (warps drift
// apart) or, in "priority" phases, only the first ready warp of a random priority order, so that
// warp runs alone until the next block barrier (the most adversarial order for a missing barrier).
inline void run_grid(int64_t grid, int block, size_t smem_bytes, size_t stack, std::mt19937_64& rng,
                     const std::function<void(unsigned char*)>& kernel) {
  const int B = block;
  dev::EmuBlock blk;
  blk.bdim = B;
  blk.gdim = grid;
  blk.threads.resize(static_cast<size_t>(B));
  blk.shfl_buf.assign(static_cast<size_t>(B), 0);
  dev::g_blk = &blk;
  unsigned char* smem = exact_alloc(smem_bytes, 128);
  std::function<void()> body = [&] { kernel(smem); };
  Fiber::body = &body;
  std::vector<int> order(static_cast<size_t>(B));
  for (int i = 0; i < B; ++i) order[i] = i;
  bool priority_phase = false;
  std::vector<int> prio(static_cast<size_t>(B / 32));
  auto new_phase = [&] {
    priority_phase = (rng() & 1) != 0;
    for (size_t w = 0; w < prio.size(); ++w) prio[w] = static_cast<int>(w);
    std::shuffle(prio.begin(), prio.end(), rng);
  };
  for (int64_t b = 0; b < grid; ++b) {
    std::memset(smem, 0xff, smem_bytes);
    blk.bid = b;
    for (int i = 0; i < B; ++i) init_fiber(blk.threads[i], &blk.sched, stack);
    new_phase();
    for (;;) {
      std::shuffle(order.begin(), order.end(), rng);
      bool ran = false;
      for (int i : order) {
        if (blk.threads[i].state != dev::kRunning) continue;
        blk.cur = i;
        swapcontext(&blk.sched, &blk.threads[i].ctx);
        ran = true;
      }
      int done = 0, at_block = 0;
      for (const auto& t : blk.threads) {
        done += t.state == dev::kDone;
        at_block += t.state == dev::kWaitBlock;
      }
      if (done == B) break;
      bool released = false;
      if (at_block == B) {
        for (auto& t : blk.threads) t.state = dev::kRunning;
        released = true;
      }
      std::vector<int> ready;
      for (int w = 0; w < B / 32; ++w) {
        int n = 0;
        for (int l = 0; l < 32; ++l) n += blk.threads[w * 32 + l].state == dev::kWaitWarp;
        if (n == 32) ready.push_back(w);
      }
      if (!ready.empty()) {
        std::vector<int> rel;
        if (priority_phase) {
          int best = ready[0];
          for (int w : ready) {
            if (prio[w] < prio[best]) best = w;
          }
          rel.push_back(best);
        } else {
          rel.push_back(ready[rng() % ready.size()]);
          for (int w : ready) {
            if (w != rel[0] && (rng() & 3) != 0) rel.push_back(w);
          }
        }
        for (int w : rel) {
          for (int l = 0; l < 32; ++l) blk.threads[w * 32 + l].state = dev::kRunning;
        }
        released = true;
      }
      if (at_block == B) new_phase();
      if (!released && !ran) {
        std::fprintf(stderr, "emulator: deadlock in block %lld (a barrier or shuffle not reached by all of "
                             "its threads): states [tid:state] (1 block barrier, 2 warp shuffle, 3 done):",
                     static_cast<long long>(b));
        for (int i = 0; i < B; ++i) std::fprintf(stderr, " %d:%d", i, blk.threads[i].state);
        std::fprintf(stderr, "\n");
        std::exit(3);
      }
    }
  }
  std::free(smem);
  dev::g_blk = nullptr;
}

}  // namespace emu
}  // namespace cuda
}  // namespace fastbald
