// padst_ext._emu: an empty Python extension module, the test-only counterpart of padst_ext._C (csrc/module.cpp).
//
// Importing it loads this shared library, whose static initializers register the `padst_emu` op library
// (emu_ops.cpp: the CUDA host layer run on the host through the kernel emulation). `import padst_ext` never imports
// it; tests call padst_ext._extension.load_emulation(), which loads _C first (this library links against it).
#include <Python.h>

PyMODINIT_FUNC PyInit__emu(void) {  // PyMODINIT_FUNC: extern "C", exported
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_emu",                                                     // m_name
      "padst_ext: the CUDA ops emulated on the host, for tests",  // m_doc
      -1,                                                         // m_size
      nullptr,                                                    // m_methods
  };
  return PyModule_Create(&module_def);
}
