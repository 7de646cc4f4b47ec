// Was fix.so built for this binary? Its build-id stamp (written by `hotfix-ctl build`)
// against the target object's build-id, and its DW_AT_producer against the target's.
#pragma once
#include "common/error.hpp"

namespace hotfix {

struct PreparedPatch;

// Refuses (exit 1, nothing changed) or adds PlanNote lines to p.notes.
Result<void> provenance__check(PreparedPatch& p);

}  // namespace hotfix
