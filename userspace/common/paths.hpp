// Places on the host that several stages share.
#pragma once

namespace hotfix {

// Bound copies of fix libraries, as the target loads them: /run/hotfix/<pid>/<id>-<name>.so.
// Written by the patch engine, matched by the planner and watch, removed by gc.
constexpr const char* kPatchDir = "/run/hotfix/";

}  // namespace hotfix
