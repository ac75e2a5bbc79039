# CUDA helpers for padst_ext: the arch list in CMake's and torch's spellings, and what a build against torch's CUDA
# wheels needs with a wrapper nvcc and a partial toolkit; each helper's comment says why.

# padst_normalize_cuda_archs(<in> <out_cmake> <out_torch>)
#   Accepts "80;90a", "8.0;9.0a", "80,90a" or "80 90a", each optionally with "+PTX". Returns the CMake spelling (80;90a, used for
#   CMAKE_CUDA_ARCHITECTURES) and the torch spelling (8.0;9.0a, used for TORCH_CUDA_ARCH_LIST).
function(padst_normalize_cuda_archs in out_cmake out_torch)
  string(REGEX REPLACE "[ ,]+" ";" _list "${in}")
  set(_cmake "")
  set(_torch "")
  foreach(_a IN LISTS _list)
    string(STRIP "${_a}" _a)
    if(_a STREQUAL "")
      continue()
    endif()
    # A "+PTX" suffix (torch style) also embeds PTX for that architecture, which newer GPUs JIT-compile.
    if(_a MATCHES "^([0-9]+)\\.([0-9])([af]?)(\\+PTX)?$")
      list(APPEND _cmake "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      list(APPEND _torch "${_a}")
    elseif(_a MATCHES "^([0-9]+)([0-9])([af]?)(\\+PTX)?$")
      list(APPEND _cmake "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
      list(APPEND _torch "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}${CMAKE_MATCH_3}${CMAKE_MATCH_4}")
    else()
      message(FATAL_ERROR
        "padst_ext: cannot parse CUDA architecture '${_a}' in PADST_CUDA_ARCHS='${in}'. "
        "Use CMake style (e.g. PADST_CUDA_ARCHS=\"80+PTX;90a\") or torch style (\"8.0+PTX;9.0a\").")
    endif()
  endforeach()
  if(NOT _cmake)
    message(FATAL_ERROR "padst_ext: PADST_CUDA_ARCHS is empty; set e.g. PADST_CUDA_ARCHS=\"80;90a\".")
  endif()
  list(REMOVE_DUPLICATES _cmake)
  list(REMOVE_DUPLICATES _torch)
  set(${out_cmake} "${_cmake}" PARENT_SCOPE)
  set(${out_torch} "${_torch}" PARENT_SCOPE)
endfunction()

# Directories of the pip CUDA wheels (nvidia/cu13/... for CUDA 13, nvidia/<lib>/... for CUDA 12) that may
# hold math-library headers / libraries, for the given CUDA major version.
function(padst_nvidia_wheel_dirs nvidia_roots cuda_major sub out)
  set(_dirs "")
  foreach(_root IN LISTS nvidia_roots)
    foreach(_pkg cu${cuda_major} cublas cusparse curand cusolver cufft cuda_nvrtc nvjitlink)
      if(IS_DIRECTORY "${_root}/${_pkg}/${sub}")
        list(APPEND _dirs "${_root}/${_pkg}/${sub}")
      endif()
    endforeach()
  endforeach()
  set(${out} "${_dirs}" PARENT_SCOPE)
endfunction()

# padst_cuda_math_header_overlay(<out_dir> <toolkit_include_dirs> <wheel_include_dirs>)
#   ATen's CUDA headers (and cusparseLt.h) include cublas_v2.h, cusparse.h, curand*.h, ... A partial toolkit
#   (like this machine's) lacks them; the pip wheels ship them in nvidia/cu13/include, but that folder also
#   holds a second copy of cuda_runtime.h & co., which must not shadow nvcc's own. So link only the
#   math-library headers that the toolkit does not already have into a build-tree folder, and add that.
#   With a full toolkit the folder stays empty.
function(padst_cuda_math_header_overlay out_dir toolkit_includes wheel_includes)
  file(REMOVE_RECURSE "${out_dir}")
  file(MAKE_DIRECTORY "${out_dir}")
  set(_linked "")
  foreach(_wdir IN LISTS wheel_includes)
    file(GLOB _hdrs LIST_DIRECTORIES false RELATIVE "${_wdir}" "${_wdir}/*.h" "${_wdir}/*.hpp")
    foreach(_h IN LISTS _hdrs)
      if(NOT _h MATCHES "^(cublas|cusparse|curand|cusolver|cufft|nvrtc|nvJitLink|cudalibxt|nvblas)")
        continue()
      endif()
      set(_in_toolkit FALSE)
      foreach(_tdir IN LISTS toolkit_includes)
        if(EXISTS "${_tdir}/${_h}")
          set(_in_toolkit TRUE)
        endif()
      endforeach()
      if(_in_toolkit OR EXISTS "${out_dir}/${_h}")
        continue()
      endif()
      file(CREATE_LINK "${_wdir}/${_h}" "${out_dir}/${_h}" SYMBOLIC COPY_ON_ERROR)
      list(APPEND _linked "${_h}")
    endforeach()
  endforeach()
  list(LENGTH _linked _n)
  if(_n GREATER 0)
    message(STATUS "padst_ext: ${_n} CUDA math-library headers taken from the pip wheels (${wheel_includes}) "
                   "via ${out_dir}")
  else()
    message(STATUS "padst_ext: the CUDA toolkit provides all math-library headers itself")
  endif()
endfunction()
