# The Python module must use the process's shared C++ runtime, not carry its own copy (python/CMakeLists.txt):
# fails when the module defines libstdc++'s std::ostream or std::locale code.
# cmake -DMODULE=<module .so> -DNM=<nm> -P check_module_runtime.cmake
execute_process(COMMAND ${NM} -D --defined-only ${MODULE} OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${NM} -D ${MODULE} failed (${rc})")
endif()
string(REGEX MATCHALL "[^\n]*(_ZNSo9_M_insertI|_ZNSt6locale5classicEv|_ZNSt8ios_base4InitC)[^\n]*" copied "${symbols}")
if(copied)
  list(LENGTH copied n)
  list(GET copied 0 first)
  message(FATAL_ERROR "${MODULE} defines ${n} symbols of the C++ runtime itself (${first}); a second runtime in "
                      "the interpreter crashes the first std::ostream << int")
endif()
message(STATUS "${MODULE}: no C++ runtime of its own")
