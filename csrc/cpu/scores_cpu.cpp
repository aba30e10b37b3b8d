// CPU kernel of fastbald::pool_scores: the op (argument checks, output, dtype dispatch, the choice
// between the two kernels, the error for a bad item), its registration, and the Python module.
//
// This file is compiled three times: into fastbald._cpu_avx512 (CPU_CAPABILITY=AVX512, so
// at::vec::Vectorized<float> is 16 lanes of one zmm register), fastbald._cpu_avx2 (-mavx2 -mfma,
// CPU_CAPABILITY=AVX2: 8 lanes) and fastbald._cpu_base (no ISA flags: portable to any x86-64),
// through scores_cpu_{avx512,avx2,base}.cpp. Python loads exactly one of them, chosen from the CPU's
// capability at run time; all register the same TORCH_LIBRARY_IMPL(fastbald, CPU).
//
// The pieces, each in its own header:
//   simd_traits.h   x86 register traits, the fast exp / log over them, math::Ops for at::vec
//   problem.h       Problem (one call: input, shape, strides, what to compute), FirstBad
//   item_kernel.h   the item (row) kernel: any T * C, lanes = MC samples of one item
//   group_kernel.h  the group kernel: T * C <= kGroupLimit, lanes = L pool items
// Every item is read from memory once; no temporary grows with N (the only allocation of size N is
// the output).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "../checks.h"
#include "../report_bad_item.h"
#include "../scores_math.h"
#include "group_kernel.h"
#include "item_kernel.h"
#include "problem.h"

#ifndef FB_CPU_MODULE
#error "define FB_CPU_MODULE (the Python module name: _cpu_avx512, _cpu_avx2 or _cpu_base)"
#endif
#define FB_CAT2(a, b) a##b
#define FB_CAT(a, b) FB_CAT2(a, b)
#define FB_STR2(a) #a
#define FB_STR(a) FB_STR2(a)

namespace fastbald {
namespace cpu {
namespace {

// Test hook: send every call to the item kernel, whatever T * C is, so that tests run both kernels
// on the same small inputs. Set once, when the library loads, from FASTBALD_FORCE_ROW_KERNEL (any
// value); the module function _force_row_kernel(flag) changes it at run time. The op reads it once
// per call.
std::atomic<bool> g_force_item_kernel{std::getenv("FASTBALD_FORCE_ROW_KERNEL") != nullptr};

at::Tensor pool_scores_cpu(const at::Tensor& x, int64_t input_kind, int64_t metrics,
                           bool check_finite, double prob_tol) {
  check_pool_scores_args(x, input_kind, metrics, prob_tol);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "fastbald::pool_scores (CPU kernel): x is on ", x.device());
  const int64_t N = x.size(0), T = x.size(1), C = x.size(2);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({math::kNumMetrics, N}, x.options().dtype(acc_type));
  out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (N == 0) return out;
  const bool item_kernel = T * C > kGroupLimit || g_force_item_kernel.load(std::memory_order_relaxed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastbald_pool_scores_cpu", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Problem<scalar_t, A> p{x.const_data_ptr<scalar_t>(),
                                 N,
                                 T,
                                 C,
                                 x.stride(0),
                                 x.stride(1),
                                 x.stride(2),
                                 static_cast<int>(input_kind),
                                 static_cast<int>(metrics),
                                 check_finite,
                                 prob_tol,
                                 math::Needs(static_cast<int>(metrics), static_cast<int>(input_kind)),
                                 out.data_ptr<A>()};
    FirstBad first_bad(N);
    if (item_kernel) {
      score_items(p, first_bad);
    } else {
      score_groups(p, first_bad);
    }
    const int64_t bad = first_bad.get();
    if (bad < N) {
      report_bad_item<scalar_t>(p.x + bad * p.sN, bad, T, C, p.sT, p.sC, p.kind, prob_tol);
    }
  });
  return out;
}

// _force_row_kernel(flag: bool) -> bool: sets the test hook above; returns its previous value.
PyObject* force_row_kernel(PyObject* /*module*/, PyObject* flag) {
  const int on = PyObject_IsTrue(flag);
  if (on < 0) return nullptr;
  return PyBool_FromLong(g_force_item_kernel.exchange(on != 0));
}

}  // namespace
}  // namespace cpu
}  // namespace fastbald

TORCH_LIBRARY_IMPL(fastbald, CPU, m) {
  m.impl("pool_scores", &fastbald::cpu::pool_scores_cpu);
}

extern "C" {
PyMODINIT_FUNC FB_CAT(PyInit_, FB_CPU_MODULE)(void) {
  static PyMethodDef methods[] = {
      {"_force_row_kernel", &fastbald::cpu::force_row_kernel, METH_O,
       "_force_row_kernel(flag) -> previous flag. Test hook: route every pool_scores call to the "
       "item (row) kernel."},
      {nullptr, nullptr, 0, nullptr},
  };
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FB_STR(FB_CPU_MODULE), nullptr, -1,
                                          methods};
  return PyModule_Create(&module_def);
}
}
