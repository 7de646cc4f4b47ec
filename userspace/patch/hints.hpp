// Hints for mistakes a user makes in the first hour, said where the plan fails.
#pragma once
#include <string>

#include "patch/fixlib.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

// A fix compiled as C++ (g++, or a .cpp file) for a C target: fix.so defines `_Z7computei`,
// "compute(int)", where the target has the C function `compute`. "" when no function of fix.so
// is such a mangled twin; else the hint to declare them extern "C".
std::string hint__cxx_fix_for_c(const SymbolTable& target, const FixLibrary& fix);

}  // namespace hotfix
