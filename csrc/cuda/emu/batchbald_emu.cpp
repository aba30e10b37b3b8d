// Host emulation of the CUDA BatchBALD kernels (../batchbald_kernels.h; device primitives:
// ../device_compat.h). Built and driven by tests/test_cuda_batchbald.py with plain g++ (no torch, no
// CUDA):
//   g++ -std=c++20 -O1 -I csrc csrc/cuda/emu/batchbald_emu.cpp -o <exe>
// Usage: <exe> IN OUT. IN: a header (struct Header) and the pool's raw storage (float32 or
// float64); OUT: info[6] = {status (0 ok, 1 invalid item), first invalid item or -1, class chunk CB,
// probabilities in shared memory (1) or the global scratch (0), largest table, kernel launches},
// then indices[b] (int64), scores[b] (float64), num_evaluated[b] (int64).
// The host loop is the very driver the CUDA op runs (bb::drive); each launch runs every block of its
// grid one after the other, each block's threads as fibers (scheduler.h, the pool-score emulator's)
// that yield at __syncthreads, in an order shuffled by a seeded RNG (one stream over all launches).
// Shared memory is poisoned (all bits set: NaN) before every block, the workspace before the run
// (but the flag and the two state scalars, which the CUDA op zeroes too), so a read of anything
// not written first shows as NaN.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "../batchbald_kernels.h"
#include "../device_compat.h"
#include "scheduler.h"

namespace {

using namespace fastbald::cuda;

struct Header {
  char magic[8];
  int64_t dtype, N, K, C, sN, sK, sC, numel, offset, b, M, seed, use_double, max_block, max_grid,
      force_scratch, sched_seed, lazy;
  double tol;
};

std::mt19937_64 g_rng;
int64_t g_launches = 0;

// One kernel launch: `grid` blocks of `block` threads, `smem` bytes of shared memory each.
void emulate(int64_t grid, int block, int64_t smem_bytes, const std::function<void(unsigned char*)>& kernel) {
  ++g_launches;
  if (block < 32 || block % 32 != 0 || block > bb::kMaxBlock || grid < 1 || smem_bytes > bb::kSmemBudget) {
    std::fprintf(stderr, "emulator: bad launch (grid %lld, block %d, smem %lld)\n", static_cast<long long>(grid),
                 block, static_cast<long long>(smem_bytes));
    std::exit(5);
  }
  emu::run_grid(grid, block, static_cast<size_t>(smem_bytes), 128 * 1024, g_rng, kernel);
}

template <class T>
void launch_one(int id, int64_t grid, int block, int64_t smem, const bb::Params& P) {
  emulate(grid, block, smem, [&](unsigned char* s) {
    if (id == bb::kEval) {
      bb::eval_dispatch<T>(P, s);
    } else {
      bb::body<T>(id, P, s);
    }
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  Header h;
  if (std::fread(&h, sizeof(h), 1, in) != 1 || std::memcmp(h.magic, "FBBBEM1\0", 8) != 0) return 2;
  if (h.dtype < 0 || h.dtype > 1 || h.numel < 0 || h.b < 0 || h.b > h.N) return 2;
  const size_t esize = h.dtype == 1 ? 8 : 4;
  unsigned char* data = emu::exact_alloc(static_cast<size_t>(h.numel) * esize, 16);
  if (h.numel > 0 && std::fread(data, esize, static_cast<size_t>(h.numel), in) != static_cast<size_t>(h.numel)) return 2;
  std::fclose(in);
  g_rng.seed(static_cast<uint64_t>(h.sched_seed));

  bb::Config cfg;
  if (h.max_block > 0) cfg.max_block = static_cast<int>(h.max_block);
  if (h.max_grid > 0) cfg.max_grid = h.max_grid;
  cfg.force_scratch = static_cast<int>(h.force_scratch);
  const int64_t tsize = h.use_double ? 8 : 4;
  const bb::Workspace ws = bb::layout(h.N, h.K, h.C, h.M, h.b, tsize, cfg);
  unsigned char* work = emu::exact_alloc(static_cast<size_t>(ws.total), 256);
  std::memset(work, 0xff, static_cast<size_t>(ws.total));  // NaN / -1: nothing may be read unwritten
  std::memset(work + ws.flag, 0, 8);
  std::memset(work + ws.state, 0, 16);

  const int64_t b = h.b;
  std::vector<int64_t> idx(static_cast<size_t>(b), -777);
  std::vector<double> scores(static_cast<size_t>(b), -777.0);
  std::vector<int64_t> nev(static_cast<size_t>(b), -777);
  bb::Params P;
  std::memset(&P, 0, sizeof(P));
  P.x = data + h.offset * static_cast<int64_t>(esize);
  P.x_double = static_cast<int>(h.dtype);
  P.N = h.N;
  P.K = h.K;
  P.C = h.C;
  P.sN = h.sN;
  P.sK = h.sK;
  P.sC = h.sC;
  P.tol = h.tol;
  P.seed = static_cast<uint64_t>(h.seed);
  P.use_double = static_cast<int>(h.use_double);
  P.idx_out = idx.data();
  P.score_out = scores.data();
  P.nev_out = nev.data();
  bb::bind(P, work, ws);
  auto launch = [&](int id, int64_t grid, int block, int64_t smem, const bb::Params& Q) {
    if (h.use_double) {
      launch_one<double>(id, grid, block, smem, Q);
    } else {
      launch_one<float>(id, grid, block, smem, Q);
    }
  };
  auto read_flag = [&] {
    unsigned long long f;
    std::memcpy(&f, work + ws.flag, 8);
    return f;
  };
  const int64_t bad = bb::drive(P, b, h.M, h.lazy != 0, cfg, launch, read_flag);
  const int CB = bb::class_chunk(h.C);
  const int64_t info[6] = {bad >= 0 ? 1 : 0, bad, CB, bb::eval_in_smem(h.K, h.C, tsize, cfg) ? 1 : 0,
                           bb::max_rows(h.K, h.C, h.M, b), g_launches};
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(info, sizeof(info), 1, out);
  std::fwrite(idx.data(), 8, idx.size(), out);
  std::fwrite(scores.data(), 8, scores.size(), out);
  std::fwrite(nev.data(), 8, nev.size(), out);
  std::fclose(out);
  std::free(work);
  std::free(data);
  return 0;
}
