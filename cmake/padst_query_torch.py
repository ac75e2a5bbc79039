"""Print what CMakeLists.txt needs to know about the installed torch, as key=value lines.

Run by CMake with the Python interpreter scikit-build-core builds for. Importing torch works on a
machine without a GPU or driver; nothing here asks whether CUDA is *available*, only how torch was
*built* (torch.version.cuda), which is what decides whether the extension can be compiled for CUDA.
"""

import importlib.util
import os
import sys

try:
    import torch
except Exception as e:  # noqa: BLE001 - report any import failure to CMake verbatim
    print(f"error=cannot import torch with {sys.executable}: {type(e).__name__}: {e}")
    sys.exit(0)

spec = importlib.util.find_spec("nvidia")
nvidia_roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []



def runtime_libstdcxx() -> str:
    """The libstdc++.so.6 this process (Python + torch) has mapped, or "" (not Linux / not found)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return ""


fields = {
    "version": str(torch.__version__),
    "cuda": torch.version.cuda or "",
    "cmake_prefix_path": torch.utils.cmake_prefix_path,
    "install_prefix": os.path.dirname(os.path.abspath(torch.__file__)),
    "cxx11_abi": str(int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))),
    "nvidia_roots": ";".join(os.path.abspath(p) for p in nvidia_roots),
    "libstdcxx": runtime_libstdcxx(),
}
for key, value in fields.items():
    print(f"{key}={value}")
