# Install rules and the Debian package (CPack): `cmake --build build --target package`
# writes build/hotfix_VERSION_amd64.deb. tools/package/check-deb checks it (lintian, dpkg -x).
include(GNUInstallDirs)
# `cmake --install` and cpack take what the build made; they do not build the tests first.
set(CMAKE_SKIP_INSTALL_ALL_DEPENDENCY TRUE)

# What --version says: the version and the checkout it was built from, and the libraries'
# versions as pkg-config reported them at configure time.
execute_process(COMMAND git describe --always --dirty --tags
  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR} OUTPUT_VARIABLE HOTFIX_GIT_DESCRIBE
  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE git_rc)
if(NOT git_rc EQUAL 0 OR NOT HOTFIX_GIT_DESCRIBE)
  set(HOTFIX_GIT_DESCRIBE "not a git checkout")
endif()
set(HOTFIX_BUILT_WITH "libbpf ${LIBBPF_VERSION}, elfutils ${LIBDW_libdw_VERSION}, Capstone ${CAPSTONE_VERSION}")
target_compile_definitions(hotfix-ctl PRIVATE
  HOTFIX_VERSION="${PROJECT_VERSION}" HOTFIX_GIT_DESCRIBE="${HOTFIX_GIT_DESCRIBE}"
  HOTFIX_BUILT_WITH="${HOTFIX_BUILT_WITH}")

# The man page: docs/man/hotfix-ctl.8.in (the hand-written part) with the verbs, their
# synopses and options filled in by the built hotfix-ctl from the option tables it parses,
# so the page and --help cannot drift.
set(HOTFIX_MAN ${PROJECT_BINARY_DIR}/hotfix-ctl.8)
add_custom_command(OUTPUT ${HOTFIX_MAN} ${HOTFIX_MAN}.gz
  COMMAND sh -c "\"$1\" --man \"$2\" > \"$3.tmp\" && mv \"$3.tmp\" \"$3\" && gzip -9n -c \"$3\" > \"$3.gz\""
          sh $<TARGET_FILE:hotfix-ctl> ${PROJECT_SOURCE_DIR}/docs/man/hotfix-ctl.8.in ${HOTFIX_MAN}
  DEPENDS hotfix-ctl ${PROJECT_SOURCE_DIR}/docs/man/hotfix-ctl.8.in
  COMMENT "man page hotfix-ctl(8) from the verbs' option tables"
  VERBATIM)
add_custom_target(hotfix_man ALL DEPENDS ${HOTFIX_MAN} ${HOTFIX_MAN}.gz)

# Debian policy: the changelog of the package, compressed (lintian wants it).
set(HOTFIX_CHANGELOG ${PROJECT_BINARY_DIR}/changelog.gz)
add_custom_command(OUTPUT ${HOTFIX_CHANGELOG}
  COMMAND gzip -9n -c ${PROJECT_SOURCE_DIR}/tools/package/changelog > ${HOTFIX_CHANGELOG}
  DEPENDS ${PROJECT_SOURCE_DIR}/tools/package/changelog)
add_custom_target(hotfix_changelog ALL DEPENDS ${HOTFIX_CHANGELOG})

install(TARGETS hotfix-ctl RUNTIME DESTINATION ${CMAKE_INSTALL_SBINDIR})
install(FILES ${HOTFIX_MAN}.gz DESTINATION ${CMAKE_INSTALL_MANDIR}/man8)
install(FILES ${PROJECT_SOURCE_DIR}/tools/completion/hotfix-ctl
  DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions)
# find_package(Hotfix) finds <prefix>/share/hotfix/cmake/HotfixConfig.cmake.
install(FILES ${PROJECT_SOURCE_DIR}/tools/HotfixPatch.cmake ${PROJECT_SOURCE_DIR}/tools/package/HotfixConfig.cmake
  DESTINATION ${CMAKE_INSTALL_DATADIR}/hotfix/cmake)
install(FILES ${PROJECT_SOURCE_DIR}/README.md ${PROJECT_SOURCE_DIR}/tools/package/copyright ${HOTFIX_CHANGELOG}
  DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/hotfix)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/docs/ DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/hotfix/docs
  FILES_MATCHING PATTERN "*.md" PATTERN "man" EXCLUDE)
# The agent's unit, once the agent exists (another change adds it).
if(EXISTS ${PROJECT_SOURCE_DIR}/tools/systemd/hotfix-agent.service)
  install(FILES ${PROJECT_SOURCE_DIR}/tools/systemd/hotfix-agent.service DESTINATION /lib/systemd/system)  # Debian 12: units under /lib
endif()

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME hotfix)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_PACKAGE_CONTACT "hotfix maintainers <hotfix-maintainers@example.org>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "patch functions of a running native process")
# The synopsis line is CPACK_PACKAGE_DESCRIPTION_SUMMARY; CPack indents these lines itself
# and turns the empty one into the " ." paragraph break.
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "hotfix-ctl replaces functions of a running C, C++ or Rust program with the
versions in a fix library (fix.so) without restarting it: it injects the
library, binds it to the program's own functions and variables, and jumps the
old functions' entries to the new ones while no thread is inside them.

It counts the calls on the new and the old code with eBPF uprobes, watches
live functions, lists and reverts patches, and recovers from an interrupted
run. It needs root (ptrace and BPF) and a Linux kernel with BTF.")
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # hotfix_VERSION_amd64.deb
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)    # Depends from dpkg-shlibdeps on hotfix-ctl
set(CPACK_DEBIAN_PACKAGE_RELEASE "")
set(CPACK_STRIP_FILES ON)
# Only what the install rules above put there: no test or fixture targets.
set(CPACK_DEB_COMPONENT_INSTALL OFF)
include(CPack)

# The package, built and used from a scratch root (lintian, dpkg -x, --version, symbols).
add_test(NAME package_deb COMMAND ${PROJECT_SOURCE_DIR}/tools/package/check-deb ${PROJECT_BINARY_DIR})
set_tests_properties(package_deb PROPERTIES SKIP_RETURN_CODE 4 TIMEOUT 300)
