# pardit_module(NAME SOURCES <.cpp...> HEADERS <names in include/pardit/NAME/> [DEPENDS <modules>])
#
# One module of the library: the static library pardit_NAME, built from SOURCES, linking the modules it
# DEPENDS on (publicly: their headers are part of its interface). Its include root is
# <build>/modules/NAME, a folder holding one link, pardit/NAME -> include/pardit/NAME, so a source or header
# of the module finds "pardit/NAME/..." and the headers of the modules below it, and nothing else: an
# include of a module above (or beside) it fails to compile. HEADERS must list the module's folder exactly
# (checked here), and with PARDIT_CHECK_HEADERS each header compiles on its own against the module alone.
#
# pardit_core owns the precompiled header (ATen); every other target reuses it.
function(pardit_module name)
  cmake_parse_arguments(M "" "" "SOURCES;HEADERS;DEPENDS" ${ARGN})
  set(target pardit_${name})
  set(root ${PROJECT_BINARY_DIR}/modules/${name})
  file(MAKE_DIRECTORY ${root}/pardit)
  file(CREATE_LINK ${PROJECT_SOURCE_DIR}/include/pardit/${name} ${root}/pardit/${name} SYMBOLIC)

  file(GLOB present RELATIVE ${PROJECT_SOURCE_DIR}/include/pardit/${name} ${PROJECT_SOURCE_DIR}/include/pardit/${name}/*.h)
  list(SORT present)
  set(listed ${M_HEADERS})
  list(SORT listed)
  if(NOT present STREQUAL listed)
    message(FATAL_ERROR "pardit_module(${name}): HEADERS (${listed}) must name exactly the headers of "
                        "include/pardit/${name}/ (${present})")
  endif()

  add_library(${target} STATIC ${M_SOURCES})
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${name} OUTPUT_NAME pardit_${name})
  target_include_directories(${target} PUBLIC $<BUILD_INTERFACE:${root}>
                                              $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  foreach(dep ${M_DEPENDS})
    target_link_libraries(${target} PUBLIC pardit_${dep})
  endforeach()
  # The precompiled header includes nlohmann/json.hpp (header-only, never in a public header).
  target_link_libraries(${target} PRIVATE nlohmann_json::nlohmann_json)
  if(name STREQUAL "core")
    # libstdc++ first: the PyPI libtorch.so exports its own (incompatible) copy of std::filesystem, and the
    # dynamic linker binds to the first library in DT_NEEDED order that defines a symbol.
    target_link_libraries(${target} PUBLIC stdc++ ${TORCH_LIBRARIES})
    target_compile_definitions(${target} PUBLIC ${PARDIT_TORCH_DEFINITIONS})
    target_include_directories(${target} PUBLIC $<BUILD_INTERFACE:${PROJECT_BINARY_DIR}/generated>)
    # ATen is the heaviest include by far: precompiled once, reused by every target.
    target_precompile_headers(${target} PRIVATE ${PROJECT_SOURCE_DIR}/src/pch.h)
  else()
    target_precompile_headers(${target} REUSE_FROM pardit_core)
  endif()
  pardit_target_options(${target})
  set_property(GLOBAL APPEND PROPERTY PARDIT_MODULES ${target})

  if(PARDIT_CHECK_HEADERS)
    set(units "")
    foreach(h ${M_HEADERS})
      set(unit ${PROJECT_BINARY_DIR}/header_check/${name}/${h}.cpp)
      file(GENERATE OUTPUT ${unit} CONTENT "#include \"pardit/${name}/${h}\"\n#include \"pardit/${name}/${h}\"\n")
      list(APPEND units ${unit})
    endforeach()
    add_library(pardit_header_check_${name} OBJECT ${units})
    target_link_libraries(pardit_header_check_${name} PRIVATE ${target})
    set_target_properties(pardit_header_check_${name} PROPERTIES UNITY_BUILD OFF)
    pardit_target_options(pardit_header_check_${name})
  endif()
endfunction()
