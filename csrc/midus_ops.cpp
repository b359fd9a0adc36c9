// Operator schemas of midus_ops (docs/design.md §1). Kernels register per device in
// csrc/cpu and csrc/cuda; fake kernels and autograd are registered in midus_ops/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "limits.h"

extern "C" {
// Importing midus_ops._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  // The CUDA kernels' limits, read by midus_ops.ops (the public op runs the reference beyond them).
  if (mod != nullptr && (PyModule_AddIntConstant(mod, "CUDA_PK_TOPK_MAX_K", midus::kPkMaxK) < 0 ||
                         PyModule_AddIntConstant(mod, "CUDA_PK_TOPK_MAX_N", midus::kPkMaxN) < 0)) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
}

// check_indices=False: the caller vouches that every index is in range (the layers' indices come
// from pk_topk; the autograd backward's were checked by its forward), so the CUDA kernels skip
// their host-side range check, a stream synchronisation that also breaks CUDA graph capture; their
// device-side checks remain. The CPU kernels always check (cheap, no synchronisation there).
TORCH_LIBRARY(midus_ops, m) {
  m.def("pk_topk(Tensor q, Tensor subkeys, int k) -> (Tensor scores, Tensor indices)");
  m.def("pk_topk_backward(Tensor grad_scores, Tensor q, Tensor subkeys, Tensor indices, bool need_q, "
        "bool need_subkeys, bool check_indices=True) -> (Tensor grad_q, Tensor grad_subkeys)");
  m.def("hive_gather(Tensor weights, Tensor indices, Tensor bank, Tensor? proj, bool deterministic, "
        "bool check_indices=True) -> Tensor");
  m.def("hive_gather_backward(Tensor grad_out, Tensor weights, Tensor indices, Tensor bank, Tensor? proj, "
        "bool deterministic, bool need_weights, bool need_bank, bool need_proj, bool check_indices=True) "
        "-> (Tensor grad_weights, Tensor grad_bank, Tensor grad_proj)");
}
