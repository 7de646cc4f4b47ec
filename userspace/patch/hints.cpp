// See hints.hpp.
#include "patch/hints.hpp"

#include <fmt/core.h>

#include <set>

namespace hotfix {

std::string hint__cxx_fix_for_c(const SymbolTable& target, const FixLibrary& fix) {
  std::set<std::string> c_names;  // the target's C functions (a mangled name equals its name)
  for (auto& f : target.functions())
    if (f.mangled == f.name && !f.name.starts_with("_Z")) c_names.insert(f.name);
  std::string examples;
  size_t count = 0;
  for (auto& s : fix.functions) {
    if (!s.name.starts_with("_Z")) continue;
    std::string demangled = symbols__demangle(s.name);
    std::string base = demangled.substr(0, demangled.find('('));
    if (base.find("::") != std::string::npos || !c_names.count(base)) continue;
    if (count++ < 3) examples += fmt::format("{}`{}` is `{}`", examples.empty() ? "" : ", ", demangled, s.name);
  }
  if (!count) return "";
  return fmt::format("fix.so was compiled as C++ (g++ or a .cpp file) for a C program: its {} (a C++ name), and the "
                     "target's functions of those names are C functions; declare them extern \"C\" in the fix "
                     "(extern \"C\" int f(int x) {{ ... }}), or compile it as C with gcc",
                     examples);
}

}  // namespace hotfix
