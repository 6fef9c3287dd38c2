# Run by `cmake --install` (PARDIT_INSTALL_RUNTIME=ON): copies every shared library the pardit executable
# needs from outside the system library folders (LibTorch, its OpenMP, NCCL, the CUDA runtime and math
# libraries, cuDNN) into <prefix>/<libdir>, next to nothing else. The executable's RUNPATH is
# $ORIGIN/../<libdir> and the copied libraries find each other through their own $ORIGIN, so the prefix
# can be moved or shared between machines (the system's Open MPI, HDF5, Boost, libpng and utf8proc are
# found where the system keeps them). Libraries that LibTorch and cuDNN open at run time (cuDNN's engine
# libraries, NVRTC) are copied with the ones they sit next to.
# Inputs: PARDIT_EXE (the built executable), PARDIT_LIBDIR (relative library folder).
file(GET_RUNTIME_DEPENDENCIES
     EXECUTABLES "${PARDIT_EXE}"
     RESOLVED_DEPENDENCIES_VAR _deps
     UNRESOLVED_DEPENDENCIES_VAR _unresolved
     CONFLICTING_DEPENDENCIES_PREFIX _conflict
     PRE_EXCLUDE_REGEXES "^libcuda\\.so" "^linux-vdso"
     POST_EXCLUDE_REGEXES "^/lib/" "^/lib64/" "^/usr/lib/" "^/usr/lib64/")
# The same soname in two folders (the CUDA toolkit's and the wheel's libcudart): either serves; take the first.
foreach(_name IN LISTS _conflict_FILENAMES)
  list(GET _conflict_${_name} 0 _first)
  list(APPEND _deps "${_first}")
endforeach()
set(_copy "")
foreach(_dep IN LISTS _deps)
  list(APPEND _copy "${_dep}")
  get_filename_component(_dir "${_dep}" DIRECTORY)
  get_filename_component(_name "${_dep}" NAME)
  if(_name MATCHES "^libcudnn\\.so")
    file(GLOB _more "${_dir}/libcudnn_*.so*")
    list(APPEND _copy ${_more})
  elseif(_name MATCHES "^libcublas\\.so")
    file(GLOB _more "${_dir}/libnvrtc*.so*")
    list(APPEND _copy ${_more})
  endif()
endforeach()
list(REMOVE_DUPLICATES _copy)
set(_bytes 0)
foreach(_lib IN LISTS _copy)
  file(INSTALL DESTINATION "${CMAKE_INSTALL_PREFIX}/${PARDIT_LIBDIR}" TYPE SHARED_LIBRARY FILES "${_lib}"
       FOLLOW_SYMLINK_CHAIN)
  file(SIZE "${_lib}" _size)
  math(EXPR _bytes "${_bytes} + ${_size} / 1048576")
endforeach()
list(LENGTH _copy _count)
message(STATUS "pardit: copied ${_count} runtime libraries (${_bytes} MiB) into ${CMAKE_INSTALL_PREFIX}/${PARDIT_LIBDIR}")
