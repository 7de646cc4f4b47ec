# hotfix_add_patch: build a fix library for `hotfix-ctl patch` from your fix.cpp.
#
#   include(path/to/hotfix/tools/HotfixPatch.cmake)
#   hotfix_add_patch(orders_fix
#     SOURCES fix.cpp                  # the fixed function(s): same names and signatures
#     [FOR_BINARY path-or-target]      # compile like this program and stamp it for its build
#     [HOTFIX_CTL path]                # default: the hotfix-ctl target, else hotfix-ctl in PATH
#     [OUTPUT_DIRECTORY dir]           # default: the current binary directory
#     [COMPILE_OPTIONS -DFOO ...]      # extra flags, after the chosen ones (they win)
#     [LINK_LIBRARIES ...])            # only libraries the service already loads
#
# produces `orders_fix.so` (no "lib" prefix).
#
# With FOR_BINARY, the flags are what `hotfix-ctl build --binary PATH` chooses from the program's
# DW_AT_producer (language standard, -O, -m*, -f*, --param and defines; see docs/design.md,
# "Provenance"), written at build time into a response file the compiler reads (`@file`), and
# the generated stamp source (the program's build-id as an ELF note) is compiled in: the result
# is what `hotfix-ctl build --binary PATH -o orders_fix.so fix.cpp` produces, and `patch` checks
# it against the running process. Compile with the program's compiler (CMAKE_<LANG>_COMPILER;
# `hotfix-ctl build --dry-run` names it): `patch` refuses a fix from another compiler family or
# major version.
#
# Without FOR_BINARY it is what the plain command
#   g++ -g -O2 -shared -fPIC fix.cpp -o orders_fix.so
# produces (unstamped: `patch` says so in its plan). Either way, made robust against
# project-wide settings:
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
  cmake_parse_arguments(ARG "" "OUTPUT_DIRECTORY;FOR_BINARY;HOTFIX_CTL" "SOURCES;COMPILE_OPTIONS;LINK_LIBRARIES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "hotfix_add_patch(${name}): give the fix sources with SOURCES fix.cpp")
  endif()
  if(NOT ARG_OUTPUT_DIRECTORY)
    set(ARG_OUTPUT_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
  endif()
  set(sources)
  foreach(src ${ARG_SOURCES})
    get_filename_component(abs ${src} ABSOLUTE)
    list(APPEND sources ${abs})
  endforeach()

  set(stamp)
  if(ARG_FOR_BINARY)
    if(TARGET ${ARG_FOR_BINARY})
      set(binary $<TARGET_FILE:${ARG_FOR_BINARY}>)
      set(binary_dep ${ARG_FOR_BINARY})
    else()
      set(binary ${ARG_FOR_BINARY})
      set(binary_dep ${ARG_FOR_BINARY})
    endif()
    set(ctl ${ARG_HOTFIX_CTL})
    set(ctl_dep)
    if(NOT ctl AND TARGET hotfix-ctl)
      set(ctl $<TARGET_FILE:hotfix-ctl>)
      set(ctl_dep hotfix-ctl)
    elseif(NOT ctl)
      find_program(HOTFIX_CTL_PROGRAM hotfix-ctl REQUIRED)
      set(ctl ${HOTFIX_CTL_PROGRAM})
    endif()
    set(lang_ext c)
    foreach(src ${sources})
      if(NOT src MATCHES "\\.c$")
        set(lang_ext cpp)
      endif()
    endforeach()
    set(gen ${CMAKE_CURRENT_BINARY_DIR}/${name}.hotfix)
    set(flags ${gen}/flags.rsp)
    set(stamp ${gen}/hotfix-stamp.${lang_ext})
    file(MAKE_DIRECTORY ${gen})
    # The same selection `hotfix-ctl build` makes (it prints its plan and notes into the build log).
    add_custom_command(OUTPUT ${flags} ${stamp}
      COMMAND ${ctl} build --binary ${binary} -o ${ARG_OUTPUT_DIRECTORY}/${name}.so ${sources}
              --dry-run --flags-file ${flags} --stamp-source ${stamp}
      DEPENDS ${binary_dep} ${ctl_dep}
      COMMENT "hotfix: flags and stamp of ${ARG_FOR_BINARY} for ${name}"
      VERBATIM)
    set_source_files_properties(${sources} PROPERTIES OBJECT_DEPENDS ${flags})
  endif()

  add_library(${name} SHARED ${sources} ${stamp})
  set_target_properties(${name} PROPERTIES
    PREFIX ""
    SUFFIX ".so"
    POSITION_INDEPENDENT_CODE ON
    C_VISIBILITY_PRESET default
    CXX_VISIBILITY_PRESET default
    LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  if(ARG_FOR_BINARY)
    target_compile_options(${name} PRIVATE -g @${flags} ${ARG_COMPILE_OPTIONS})
  else()
    target_compile_options(${name} PRIVATE -g -O2 ${ARG_COMPILE_OPTIONS})
  endif()
  target_link_options(${name} PRIVATE -Wl,-z,undefs)
  if(ARG_LINK_LIBRARIES)
    target_link_libraries(${name} PRIVATE ${ARG_LINK_LIBRARIES})
  endif()
endfunction()
