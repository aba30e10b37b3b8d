// The run-time choice of a CPU extension's loops (scalar, AVX-512 or AVX2), its overrides (the
// FASTBALD_CPU_KERNEL variable, as for the scoring and BatchBALD kernels, and _force_kernel for the
// tests), and the Python functions that expose them: vectorized(), kernel(), _force_kernel(k).
// Shared by csrc/cpu/stochastic_cpu.cpp and csrc/cpu/epig_cpu.cpp; each passes its own CPU checks
// (the features its target attributes need), and builds its own PyMethodDef table from these.
#pragma once

#include <Python.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fastbald {
namespace simd {

enum Kernel : int { kScalar = 0, kAvx512 = 1, kAvx2 = 2 };

inline bool no_avx2() { return false; }  // for a module without AVX2 loops

// FASTBALD_CPU_KERNEL (read at each call): base -> scalar, avx2 -> the AVX2 loops, -1 (automatic)
// when unset, avx512 or anything else.
inline int env_kernel() {
  const char* v = std::getenv("FASTBALD_CPU_KERNEL");
  if (v == nullptr) return -1;
  if (std::strcmp(v, "base") == 0) return kScalar;
  if (std::strcmp(v, "avx2") == 0) return kAvx2;
  return -1;
}

template <bool (*HasAvx512)(), bool (*HasAvx2)() = no_avx2>
struct Dispatch {
  // -1: FASTBALD_CPU_KERNEL, else automatic (the widest kind the CPU has); else that kind where the
  // CPU has it, scalar where not.
  static inline std::atomic<int> forced{-1};

  static int kind() {
    int f = forced.load();
    if (f < 0) f = env_kernel();
    if (f < 0) return HasAvx512() ? kAvx512 : HasAvx2() ? kAvx2 : kScalar;
    if (f == kAvx512) return HasAvx512() ? kAvx512 : kScalar;
    if (f == kAvx2) return HasAvx2() ? kAvx2 : kScalar;
    return kScalar;
  }

  // METH_NOARGS vectorized() -> bool: the AVX-512 loops run.
  static PyObject* py_vectorized(PyObject*, PyObject*) { return PyBool_FromLong(kind() == kAvx512); }
  // METH_NOARGS kernel() -> 'scalar' | 'avx512' | 'avx2'.
  static PyObject* py_kernel(PyObject*, PyObject*) {
    static const char* const names[] = {"scalar", "avx512", "avx2"};
    return PyUnicode_FromString(names[kind()]);
  }
  // METH_O _force_kernel(k): -1 automatic, 0 scalar, 1 AVX-512, 2 AVX2.
  static PyObject* py_force_kernel(PyObject*, PyObject* arg) {
    const long k = PyLong_AsLong(arg);
    if (k == -1 && PyErr_Occurred()) return nullptr;
    forced = static_cast<int>(k);
    Py_RETURN_NONE;
  }
};

}  // namespace simd
}  // namespace fastbald
