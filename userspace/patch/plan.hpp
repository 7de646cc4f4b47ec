// The patch plan: which function of the running target is replaced by which function of
// fix.so. A replacement is found by the MANGLED name: the user copied the buggy function
// into fix.cpp and kept its name and signature.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "patch/fixlib.hpp"
#include "patch/registry.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct PlanEntry {
  Function target;            // the live function whose entry gets the jump
  std::string replacement;    // its replacement's symbol in fix.so (same mangled name)
  uint64_t replacement_value = 0;  // st_value in fix.so: runtime address = load base + this
  uint64_t replacement_size = 0;
};

struct PatchPlan {
  std::string library;        // fix.so as given by the user
  std::vector<PlanEntry> entries;
};

struct PlanOptions {
  std::vector<std::string> patterns;  // symbols__select syntax; empty = everything fix.so replaces
  std::string object;                 // --object: restrict the target functions to one object
  // Objects under this directory are earlier fix libraries, never patch targets themselves.
  std::string patch_dir = kPatchDir;
  // The target's main executable (e.g. /proc/PID/exe). When set, the default selection
  // matches a fix.so function to a target `static` function of the same demangled name only
  // in the executable, never to a library's private helper that happens to share the name.
  std::string executable;
};

// Match `fix` against the target's functions. Errors: a selected target function without a
// replacement ("fix.so has no replacement for X", with close names in fix.so), a name that
// means several target functions (lists them with object, address and source file), and a
// fix.so that replaces nothing.
Result<PatchPlan> plan__build(const SymbolTable& target, const FixLibrary& fix, const PlanOptions& opts = {});

// What plan__build needs of a partial symbol table (SymbolTable::for_pid_needing): the
// objects that may hold a function the patterns select, or one fix.so replaces by default.
void plan__add_needs(const FixLibrary& fix, const PlanOptions& opts, SymbolNeeds& needs);

// "helper(int) in /path/exe at 0x1139 (bind_twins_a.cpp:7)": a candidate in an ambiguity error.
std::string plan__describe(const SymbolTable& table, const Function& f);

// The source file:line DWARF gives for `f` (empty when there is no debug info).
std::string plan__source_of(const SymbolTable& table, const Function& f);

}  // namespace hotfix
