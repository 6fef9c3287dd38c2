# Locates LibTorch. Order: an explicit Torch_DIR / CMAKE_PREFIX_PATH, else the torch package of
# PARDIT_PYTHON (default: the virtual environment that launch/install.sh creates, then python3).
# The pinned version lives in launch/versions.env; another version is accepted with a warning.
file(STRINGS ${PROJECT_SOURCE_DIR}/launch/versions.env _pv REGEX "^PARDIT_TORCH_VERSION=")
string(REPLACE "PARDIT_TORCH_VERSION=" "" PARDIT_TORCH_VERSION "${_pv}")

if(NOT Torch_DIR)
  if(NOT PARDIT_PYTHON)
    if(DEFINED ENV{PARDIT_PYTHON})
      set(PARDIT_PYTHON $ENV{PARDIT_PYTHON})
    elseif(DEFINED ENV{PARDIT_VENV} AND EXISTS "$ENV{PARDIT_VENV}/bin/python")
      set(PARDIT_PYTHON "$ENV{PARDIT_VENV}/bin/python")
    elseif(EXISTS "$ENV{HOME}/.cache/pardit/venv-torch-${PARDIT_TORCH_VERSION}/bin/python")
      set(PARDIT_PYTHON "$ENV{HOME}/.cache/pardit/venv-torch-${PARDIT_TORCH_VERSION}/bin/python")
    else()
      set(PARDIT_PYTHON python3)
    endif()
  endif()
  execute_process(COMMAND ${PARDIT_PYTHON} -c "import torch; print(torch.utils.cmake_prefix_path)"
                  OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "LibTorch not found: run launch/install.sh, or pass -DTorch_DIR=... or -DPARDIT_PYTHON=...")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")
endif()

# A CUDA build of LibTorch pulls in the CUDA toolkit; without a toolkit it still works on the CPU.
find_package(Torch REQUIRED)
if(NOT Torch_VERSION VERSION_EQUAL PARDIT_TORCH_VERSION)
  message(WARNING "LibTorch ${Torch_VERSION} found; pardit pins ${PARDIT_TORCH_VERSION} (launch/versions.env)")
endif()

set(PARDIT_WITH_CUDA OFF)
if(TARGET torch_cuda OR "${TORCH_LIBRARIES}" MATCHES "torch_cuda")
  set(PARDIT_WITH_CUDA ON)
endif()
set(PARDIT_TORCH_DEFINITIONS "")
if(PARDIT_WITH_CUDA)
  list(APPEND PARDIT_TORCH_DEFINITIONS PARDIT_WITH_CUDA=1)
endif()
message(STATUS "pardit: LibTorch ${Torch_VERSION}, CUDA support: ${PARDIT_WITH_CUDA}")

# NCCL: the library LibTorch itself loads (the nvidia-nccl wheel next to torch), else the CUDA toolkit's.
set(PARDIT_WITH_NCCL OFF)
if(PARDIT_WITH_CUDA)
  get_filename_component(_torch_site "${TORCH_INSTALL_PREFIX}/.." ABSOLUTE)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS "${_torch_site}/nvidia/nccl/include" ENV NCCL_HOME PATH_SUFFIXES include
            PATHS /usr/local/cuda/include)
  find_library(NCCL_LIBRARY NAMES libnccl.so.2 nccl NAMES_PER_DIR HINTS "${_torch_site}/nvidia/nccl/lib" ENV NCCL_HOME
               PATH_SUFFIXES lib lib64 PATHS /usr/local/cuda/lib64)
  if(NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(PARDIT_WITH_NCCL ON)
    list(APPEND PARDIT_TORCH_DEFINITIONS PARDIT_WITH_NCCL=1)
  endif()
endif()
message(STATUS "pardit: NCCL backend: ${PARDIT_WITH_NCCL} ${NCCL_LIBRARY}")
