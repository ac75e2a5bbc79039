// What padst_ext._C exports besides PyInit__C. _C is built with hidden symbols; the test-only emulation module
// padst_ext._emu (csrc/emu/, see CMakeLists.txt) links against _C so that it runs production's argument checks
// (checks.h, exported with `#pragma GCC visibility push(default)`) and shares its metadata cache (meta_cache.h,
// PADST_EXPORT): one cache per process, which torch.ops.padst._metadata_cache_* report for both libraries.
#pragma once

#define PADST_EXPORT __attribute__((visibility("default")))
