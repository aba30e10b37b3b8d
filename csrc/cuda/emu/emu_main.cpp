// Host emulation of the CUDA pool-score kernels (see ../device_compat.h and ../NOTES.md).
//
// Built by tests/test_cuda.py with plain g++ (no torch, no CUDA), and a second time with
// AddressSanitizer + UndefinedBehaviorSanitizer (the flags: EMU_FLAGS in tests/emulator_build.py):
//   g++ -std=c++20 -O1 -I csrc csrc/cuda/emu/emu_main.cpp -o <exe>
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -I csrc ... -o <exe>
// The input storage and the block's shared memory are allocated at their exact sizes (no slack),
// so under ASan a read or write one byte past either is a heap-buffer-overflow.
// Usage: <exe> IN OUT. IN holds the problem (header + raw input storage, written by the test), OUT
// receives the status, the chosen plan and the [7, N] output (plan_only: the plan for the given
// shape, strides and device limits, nothing run; the output stays at the sentinel -777). Every
// CUDA block is run as `block` fibers (scheduler.h, ../device_compat.h); the blocks of the grid run
// one after the other, with shared memory poisoned (all bits set: NaN / -1) before each.
// <exe> --selftest-oob reads one byte past an exact-size buffer (the sanitizer build must abort:
// the tests check that the sanitizer is really on).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../device_compat.h"
#include "../item_kernel.h"
#include "../kernels.h"
#include "../plan.h"
#include "../strip_kernel.h"
#include "scheduler.h"

namespace {

// Minimal half / bfloat16 storage types (the GPU build uses c10::Half / c10::BFloat16; only the
// conversion to float matters to the kernels).
struct Half16 {
  uint16_t bits;
  operator float() const {
    const uint32_t sign = (bits >> 15) & 1, exp = (bits >> 10) & 0x1f, man = bits & 0x3ff;
    uint32_t f;
    if (exp == 0) {
      if (man == 0) {
        f = sign << 31;
      } else {  // subnormal
        int e = -1;
        uint32_t m = man;
        do {
          ++e;
          m <<= 1;
        } while ((m & 0x400) == 0);
        f = (sign << 31) | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
      }
    } else if (exp == 0x1f) {
      f = (sign << 31) | 0x7f800000u | (man << 13);
    } else {
      f = (sign << 31) | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float r;
    std::memcpy(&r, &f, 4);
    return r;
  }
};
struct BF16 {
  uint16_t bits;
  operator float() const {
    const uint32_t f = static_cast<uint32_t>(bits) << 16;
    float r;
    std::memcpy(&r, &f, 4);
    return r;
  }
};

}  // namespace

template <>
struct fastbald::cuda::StripIsBf16<BF16> {
  static constexpr bool value = true;
};

namespace {

struct Header {
  char magic[8];
  int64_t dtype, N, T, C, sN, sT, sC, numel, offset, kind, metrics, check;
  double tol;
  int64_t force_path, force_generic, force_one_array, tile_budget, block, max_grid, force_args,
      force_kk, smem_optin, smem_per_sm, plan_only, seed, row_lanes;
};

// Runs the planned kernel on every block of the grid (emu/scheduler.h), the schedule seeded by `seed`.
template <class S, class A>
void emulate(fastbald::cuda::Params& P, uint64_t seed) {
  using namespace fastbald::cuda;
  std::mt19937_64 rng(seed);
  emu::run_grid(P.grid, P.block, static_cast<size_t>(P.smem), 256 * 1024, rng, [&](unsigned char* smem) {
    if (P.path == kTilePath) {
      tile_body<S, A>(P, smem);
    } else if (P.path == kItemPath) {
      item_dispatch<S>(P, smem);
    } else if (P.path == kStripPath) {
      strip_dispatch<S>(P, smem);
    } else {
      stream_body<S, A>(P, smem);
    }
  });
}

template <class S, class A>
int run(const Header& h, const unsigned char* data, FILE* out) {
  using namespace fastbald::cuda;
  Params P{};
  P.N = h.N;
  P.T = h.T;
  P.C = h.C;
  P.sN = h.sN;
  P.sT = h.sT;
  P.sC = h.sC;
  P.kind = static_cast<int>(h.kind);
  P.metrics = static_cast<int>(h.metrics);
  P.check = static_cast<int>(h.check);
  P.tol = h.tol;
  DeviceLimits lim;
  if (h.smem_optin > 0) lim.smem_optin = h.smem_optin;
  if (h.smem_per_sm > 0) lim.smem_per_sm = h.smem_per_sm;
  PlanOverrides ov;
  ov.force_path = static_cast<int>(h.force_path);
  ov.force_generic = static_cast<int>(h.force_generic);
  ov.force_one_array = static_cast<int>(h.force_one_array);
  ov.tile_budget = h.tile_budget;
  ov.block = static_cast<int>(h.block);
  ov.max_grid = h.max_grid;
  ov.force_args = static_cast<int>(h.force_args);
  ov.force_kk = static_cast<int>(h.force_kk);
  ov.row_lanes = static_cast<int>(h.row_lanes);
  P.x = data + h.offset * static_cast<int64_t>(sizeof(S));
  std::string err;
  int64_t status = 0, bad = -1;
  std::vector<A> o(h.plan_only ? 0 : static_cast<size_t>(7 * h.N), static_cast<A>(-777.0));
  const bool ok = make_plan(P, sizeof(S), sizeof(A), lim, ov, &err);
  unsigned long long flag = 0;
  if (!ok) {
    status = 1;
    std::fprintf(stderr, "plan: %s\n", err.c_str());
  } else if (h.N > 0 && !h.plan_only) {
    P.out = o.data();
    P.flag = h.check ? &flag : nullptr;
    emulate<S, A>(P, static_cast<uint64_t>(h.seed));
    if (flag != 0) {
      status = 2;
      bad = static_cast<int64_t>(~0ull - flag);
    }
  }
  const int64_t info[17] = {status,      bad,          P.path,      P.kk,     P.load_mode, P.row_lanes,
                            P.two_arrays, P.col_lanes,  P.smem,      P.grid,   P.cnt_mode,  P.Cp,
                            P.gen_order,  P.tnc_rows,   P.block,     P.st_nv,  P.st_mode};
  std::fwrite(info, sizeof(info), 1, out);
  std::fwrite(o.data(), sizeof(A), o.size(), out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::strcmp(argv[1], "--selftest-oob") == 0) {
    unsigned char* b = fastbald::cuda::emu::exact_alloc(40, 16);
    std::memset(b, 1, 40);
    volatile unsigned char* vb = b;
    const int r = vb[40];  // one past the end
    std::free(b);
    return r == 12345 ? 1 : 0;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT | --selftest-oob\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  Header h;
  if (std::fread(&h, sizeof(h), 1, in) != 1 || std::memcmp(h.magic, "FBEMU1\0\0", 8) != 0) return 2;
  static const int64_t esize[4] = {4, 8, 2, 2};
  if (h.dtype < 0 || h.dtype > 3) return 2;
  if (h.numel < 0) return 2;
  // The tensor's whole storage at its exact size, 16-byte aligned like a device allocation (so the
  // storage offset alone decides the alignment of the first element).
  const size_t nbytes = static_cast<size_t>(h.numel * esize[h.dtype]);
  unsigned char* data = fastbald::cuda::emu::exact_alloc(nbytes, 16);
  if (h.numel > 0 && std::fread(data, static_cast<size_t>(esize[h.dtype]), static_cast<size_t>(h.numel), in) !=
                         static_cast<size_t>(h.numel))
    return 2;
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  int rc = 0;
  switch (h.dtype) {
    case 0: rc = run<float, float>(h, data, out); break;
    case 1: rc = run<double, double>(h, data, out); break;
    case 2: rc = run<Half16, float>(h, data, out); break;
    default: rc = run<BF16, float>(h, data, out); break;
  }
  std::fclose(out);
  std::free(data);
  return rc;
}
