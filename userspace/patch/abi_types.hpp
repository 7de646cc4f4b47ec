// Do the replacements have the target's signatures, and do the types they share with the
// target have the same layout? Compared from DWARF: the target's (wherever `symbols` finds
// its debug info) and fix.so's. Where either side has no DWARF, the plan says what was not
// checked and the patch proceeds.
#pragma once
#include "common/error.hpp"

namespace hotfix {

struct PreparedPatch;

// Refuses (exit 1, nothing changed) or adds PlanNote lines to p.notes.
Result<void> abi__check_types(PreparedPatch& p);

}  // namespace hotfix
