// x86_64 register file of a stopped thread: exactly the PTRACE_GETREGS layout.
#pragma once
#include <sys/user.h>

#include "arch/arch.hpp"

namespace hotfix::arch {

struct Regs {
  user_regs_struct u;
};
static_assert(sizeof(Regs) <= sizeof(RegsBuffer::bytes), "RegsBuffer too small for user_regs_struct");
static_assert(alignof(Regs) <= alignof(RegsBuffer), "RegsBuffer under-aligned for user_regs_struct");

}  // namespace hotfix::arch
