// padst_ext._C: an empty Python extension module.
//
// Importing it makes Python dlopen this shared library, which runs the static initializers of every
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL block linked into it (csrc/ops.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cpp):
// that is how the padst::* ops get registered with the dispatcher. No Python functions are exposed here;
// call the ops through torch.ops.padst.* (python/padst_ext/ops.py). Load it via padst_ext._extension.load(),
// which first checks that the running torch is the one this was built against.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC: extern "C", exported
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                         // m_name
      "padst_ext native ops (registered with torch)",  // m_doc
      -1,                                           // m_size
      nullptr,                                      // m_methods
  };
  return PyModule_Create(&module_def);
}
