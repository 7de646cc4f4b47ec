# find_package(Hotfix): hotfix_add_patch() for building fix libraries (see HotfixPatch.cmake),
# and HOTFIX_CTL, the installed hotfix-ctl.
include(${CMAKE_CURRENT_LIST_DIR}/HotfixPatch.cmake)
find_program(HOTFIX_CTL hotfix-ctl PATHS /usr/sbin /sbin)
set(Hotfix_FOUND TRUE)
