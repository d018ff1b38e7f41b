# Script mode: writes OUTPUT, a header holding every .cl file in SOURCES as a raw string literal.
# Each entry is {"<file name without .cl>", R"MLSTMCL(...)MLSTMCL"}.
set(body "// Generated from kernels/opencl/*.cl by cmake/embed_opencl.cmake; do not edit.\n#pragma once\n#include <array>\n#include <string_view>\nnamespace mlstm::opencl::embedded {\nstruct Source { std::string_view name; std::string_view text; };\n")
set(entries "")
set(count 0)
foreach(src ${SOURCES})
  get_filename_component(name ${src} NAME_WE)
  file(READ ${src} text)
  string(APPEND entries "  Source{\"${name}\", R\"MLSTMCL(${text})MLSTMCL\"},\n")
  math(EXPR count "${count} + 1")
endforeach()
string(APPEND body "inline constexpr std::array<Source, ${count}> kSources{{\n${entries}}};\n}  // namespace mlstm::opencl::embedded\n")
file(WRITE ${OUTPUT}.tmp "${body}")
execute_process(COMMAND ${CMAKE_COMMAND} -E copy_if_different ${OUTPUT}.tmp ${OUTPUT})
