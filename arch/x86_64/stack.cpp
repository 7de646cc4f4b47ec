// Stack layout facts for the consistency scan (userspace/patch/consistency.cpp).
#include "arch/arch.hpp"

#include <sys/ucontext.h>

#include <cstddef>

namespace hotfix::arch {

// `call` pushes the return address, so every live caller frame leaves one on the stack.
bool return_addresses_on_stack() { return true; }
// Return addresses are pushed as 8-byte words and the stack pointer stays 8-byte aligned.
size_t stack_slot_size() { return 8; }
unsigned dwarf_sp_register() { return 7; }

// mov rax, 15 (__NR_rt_sigreturn); syscall
std::vector<uint8_t> sigreturn_sequence() { return {0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05}; }
// struct rt_sigframe { char* pretcode; ucontext_t uc; siginfo_t info; }: glibc's ucontext_t
// starts with the kernel's (uc_flags, uc_link, uc_stack, uc_mcontext with gregs in its order).
size_t sigframe_pc_offset() { return 8 + offsetof(ucontext_t, uc_mcontext.gregs) + 8 * REG_RIP; }
size_t sigframe_sp_offset() { return 8 + offsetof(ucontext_t, uc_mcontext.gregs) + 8 * REG_RSP; }

}  // namespace hotfix::arch
