// `import bigmodel._C` loads this shared library, which registers the ops as a side effect.
// The module itself is empty: ops are reached as torch.ops.bigmodel.* (no pybind11 functions).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
