// What to say when a process's program has no symbols to match: it was stripped, and the
// debug file that would have them is not installed.
#pragma once
#include <string>

#include "symbols/symbols.hpp"

namespace hotfix {

// "" unless `table` is a process's and its executable has neither a .symtab nor a separate
// debug file. Else how to get one: the -dbgsym package of the Debian package that owns it
// (dpkg-query -S), the build-id path under the debug directory, and HOTFIX_DEBUG_ROOT.
std::string symbols__stripped_hint(const SymbolTable& table);

// The Debian package that owns `path` ("" when none does). Tries the path as given and, for
// merged /usr (/usr/bin/x is /bin/x in dpkg's database), without its /usr prefix.
std::string symbols__owning_package(const std::string& path);

}  // namespace hotfix
