// Python bindings of deepopt's CUDA multi-tensor kernels (loaded by deepopt/_cuda_ext.py).
#include "multi_tensor.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgd_update", &deepopt::sgd_update, "AssociativeMomentum (SGD value map), multi-tensor");
  m.def("adam_update", &deepopt::adam_update, "AssociativeMomentum (Adam value map), multi-tensor");
}
