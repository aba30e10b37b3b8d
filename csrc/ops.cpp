// Op schemas of the fastbald library, and the Python module object of fastbald._C.
#include <Python.h>
#include <torch/library.h>

extern "C" {
static PyObject* fb_built_with_cuda(PyObject*, PyObject*) {
#ifdef FASTBALD_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
static PyMethodDef fb_methods[] = {
    {"built_with_cuda", fb_built_with_cuda, METH_NOARGS,
     "True when the CUDA kernels were compiled into this library."},
    {nullptr, nullptr, 0, nullptr}};
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fb_methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastbald, m) {
  // x: [N, T, C] (any strides), input_kind: 0 logits / 1 log_probs / 2 probs,
  // metrics: bit mask over (entropy, expected_entropy, bald, variation_ratio, mean_std, margin,
  // least_confidence). Returns [7, N] (float64 for float64 x, else float32); rows not asked for
  // are NaN. check_finite: error naming the first pool item with NaN/+inf/all -inf (and, for
  // probs, negative values or rows whose sum is off by more than prob_tol).
  m.def(
      "pool_scores(Tensor x, int input_kind, int metrics, bool check_finite, float prob_tol) "
      "-> Tensor");
  // Greedy BatchBALD (csrc/cpu/batchbald_cpu.cpp). log_probs: [N, K, C] log-probabilities (any
  // strides). Returns (indices [b] int64, scores [b] float64: joint MI of the first i+1 points,
  // evaluated [b] int64: candidates evaluated per step). use_double: inner products in float64;
  // lazy: lazy greedy by upper bounds (submodularity); prob_tol: |sum_c exp - 1| bound (inf: off).
  m.def(
      "batchbald(Tensor log_probs, int batch_size, int num_samples, int seed, bool use_double, "
      "bool lazy, float prob_tol) -> (Tensor, Tensor, Tensor)");
}
