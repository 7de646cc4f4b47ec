// Does every path that ran the old code run the fix? Inlined copies, clones (.isra,
// .constprop, .part), .cold parts and aliases of the replaced functions keep old code the
// jump does not reach: refused unless covered or --allow-uncovered.
#pragma once
#include "common/error.hpp"

namespace hotfix {

struct PreparedPatch;

// Refuses (exit 1, nothing changed) or adds PlanNote lines to p.notes.
Result<void> coverage__check(PreparedPatch& p);

}  // namespace hotfix
