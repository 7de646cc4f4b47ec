#include "arch/arch.hpp"

namespace hotfix::arch {
const char* name() { return "x86_64"; }
}  // namespace hotfix::arch
