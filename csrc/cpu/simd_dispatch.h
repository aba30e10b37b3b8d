// The run-time choice of a CPU extension's loops (scalar, AVX-512 or AVX2), its override for the
// tests, and the Python functions that expose both: vectorized(), kernel(), _force_kernel(k).
// Shared by csrc/cpu/stochastic_cpu.cpp and csrc/cpu/epig_cpu.cpp; each passes its own CPU checks
// (the features its target attributes need), and builds its own PyMethodDef table from these.
#pragma once

#include <Python.h>

#include <atomic>

namespace fastbald {
namespace simd {

enum Kernel : int { kScalar = 0, kAvx512 = 1, kAvx2 = 2 };

inline bool no_avx2() { return false; }  // for a module without AVX2 loops

template <bool (*HasAvx512)(), bool (*HasAvx2)() = no_avx2>
struct Dispatch {
  // -1: automatic (the widest kind the CPU has); else that kind where the CPU has it, scalar where not.
  static inline std::atomic<int> forced{-1};

  static int kind() {
    const int f = forced.load();
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
