// Stack layout facts for the consistency scan (userspace/patch/consistency.cpp).
#include "arch/arch.hpp"

namespace hotfix::arch {

// `call` pushes the return address, so every live caller frame leaves one on the stack.
bool return_addresses_on_stack() { return true; }
// Return addresses are pushed as 8-byte words and the stack pointer stays 8-byte aligned.
size_t stack_slot_size() { return 8; }
unsigned dwarf_sp_register() { return 7; }

}  // namespace hotfix::arch
