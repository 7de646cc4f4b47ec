// Places on the host that several stages share.
#pragma once
#include <string_view>

namespace hotfix {

// Where builds before memfd delivery wrote bound copies of fix libraries
// (/run/hotfix/<pid>/<id>-<name>.so); gc still removes what dead processes left there.
constexpr const char* kPatchDir = "/run/hotfix/";

// How /proc/PID/maps names a fix library delivered into the target (patch/deliver.hpp):
// "/memfd:hotfix:<id>:<sha256>:<name> (deleted)".
constexpr const char* kFixCopyPrefix = "/memfd:hotfix:";

// Is this mapped object (Function::object, a maps path) a fix copy, ours or an older build's?
inline bool path__is_fix_copy(std::string_view object) {
  return object.starts_with(kFixCopyPrefix) || object.starts_with(kPatchDir);
}

}  // namespace hotfix
