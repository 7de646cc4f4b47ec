# hotfix_add_patch: build a fix library for `hotfix-ctl patch` from your fix.cpp.
#
#   include(path/to/hotfix/tools/HotfixPatch.cmake)
#   hotfix_add_patch(orders_fix
#     SOURCES fix.cpp                  # the fixed function(s): same names and signatures
#     [OUTPUT_DIRECTORY dir]           # default: the current binary directory
#     [COMPILE_OPTIONS -DFOO ...]      # extra flags (use the service's own flags if it has any)
#     [LINK_LIBRARIES ...])            # only libraries the service already loads
#
# produces `orders_fix.so` (no "lib" prefix). It is what the plain command
#   g++ -g -O2 -shared -fPIC fix.cpp -o orders_fix.so
# produces, made robust against project-wide settings:
#   -g / no stripping    hotfix matches replacements by their symbol in .symtab, static
#                        functions included, and names source lines in its messages;
#   -fPIC -shared        fix.so is dlopen()ed into the running service;
#   default visibility   the replaced functions must stay visible symbols;
#   -Wl,-z,undefs        references to the service's own functions and variables (even its
#                        `static` ones: declare them `extern` in fix.cpp) stay undefined;
#                        hotfix binds them to the live ones, so a project-wide
#                        -Wl,--no-undefined must not reject them.
# Do not link the service itself into fix.so: that would make private copies of its state.
function(hotfix_add_patch name)
  cmake_parse_arguments(ARG "" "OUTPUT_DIRECTORY" "SOURCES;COMPILE_OPTIONS;LINK_LIBRARIES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "hotfix_add_patch(${name}): give the fix sources with SOURCES fix.cpp")
  endif()
  if(NOT ARG_OUTPUT_DIRECTORY)
    set(ARG_OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
  endif()
  add_library(${name} SHARED ${ARG_SOURCES})
  set_target_properties(${name} PROPERTIES
    PREFIX ""
    SUFFIX ".so"
    POSITION_INDEPENDENT_CODE ON
    C_VISIBILITY_PRESET default
    CXX_VISIBILITY_PRESET default
    LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  target_compile_options(${name} PRIVATE -g -O2 ${ARG_COMPILE_OPTIONS})
  target_link_options(${name} PRIVATE -Wl,-z,undefs)
  if(ARG_LINK_LIBRARIES)
    target_link_libraries(${name} PRIVATE ${ARG_LINK_LIBRARIES})
  endif()
endfunction()
