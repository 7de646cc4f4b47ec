// Does every path that ran the old code run the fix? The entry jump reaches only the calls
// that enter the function at its entry. Other places run its code too:
//  - inlined copies (DW_TAG_inlined_subroutine whose abstract origin is the function);
//  - clones (`.isra.N`, `.constprop.N`, `.part.N`, and subprogram DIEs whose abstract origin
//    is the function): separate entry points with changed signatures, never jumped over;
//  - aliases (other names at the same address, identical-code-folded bodies): the jump
//    changes every caller of those names too.
// A place is covered when the fix also replaces the function that holds it: for an inlined
// copy, the function it was inlined into; for a clone, every function that calls it (a clone
// is local to its unit and has its own signature: only direct calls there reach it); for an
// alias, when the alias is in the patch (named by a pattern, or defined by fix.so when no
// pattern is given).
// Uncovered places are refused unless --allow-uncovered; then they are recorded with the
// patch (PatchRecord::uncovered) for list and stats.
// The `.cold` part of a planned function is part of its body: a direct branch from it into
// the overwritten entry bytes is refused like one from the body itself.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "patch/registry.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct PreparedPatch;

// One place that runs a planned function's code, and whether the patch covers it.
struct CoveragePlace {
  UncoveredPlace place;
  bool covered = false;
  std::string detail;  // for a clone: who calls it ("called from use_scale")
  uint64_t in_address = 0;  // the entry of the function holding it (the clone's own entry)
};

struct CoverageFindings {
  std::vector<CoveragePlace> places;
  // Objects holding planned functions whose DWARF could not be read: inlined copies (and
  // clones known only to DWARF) were not looked for there.
  std::vector<std::string> without_dwarf;
  std::vector<std::string> searched;  // objects whose DWARF was walked
  size_t units = 0;                   // compilation units walked: only the functions' own without LTO,
                                      // unless one comes from a header (then every unit)
  size_t dies = 0;                    // DWARF entries visited (the cost of the walk)
  double walk_ms = 0;
};

// What else runs the code of `planned` (functions of `table`): one DWARF walk per object
// that holds planned functions (only that object: inlining never crosses objects), plus
// clone symbols and aliases from the symbol table. `alias_in_patch(name)` says whether an
// alias (as in the ELF file) is part of the patch; `patched_as[i]` is the name planned[i] is
// replaced by (fix.so's symbol: the name the user knows among its aliases).
CoverageFindings coverage__find(const SymbolTable& table, const std::vector<Function>& planned,
                                const std::function<bool(const std::string&)>& alias_in_patch,
                                const std::vector<std::string>& patched_as = {});

// "tax is inlined into checkout_a (shop.c:12)": one place, for plans and errors.
std::string coverage__describe(const UncoveredPlace& u);

// Refuses (exit 1, nothing changed) or adds PlanNote lines to p.notes and, under
// --allow-uncovered, the uncovered places to p.uncovered.
Result<void> coverage__check(PreparedPatch& p);

}  // namespace hotfix
