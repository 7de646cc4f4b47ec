#include "common/error.hpp"

#include <cstring>

namespace hotfix {
std::string errno_text(int err) { return std::strerror(err < 0 ? -err : err); }
}  // namespace hotfix
