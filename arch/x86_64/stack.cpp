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

#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {

// Pushes and `sub rsp, imm` move the stack pointer by a known amount; any other instruction
// that writes rsp (or reads it in a way we do not model, like `leave` or `mov rsp, rbp`)
// makes the depth unknown. endbr64, moves between other registers, etc. leave it.
std::optional<uint64_t> stack_depth_after(std::span<const uint8_t> code, uint64_t address, size_t bytes) {
  Decoder d;
  if (!d.ok()) return std::nullopt;
  uint64_t depth = 0;
  for (size_t at = 0; at < bytes;) {
    const cs_insn* insn = d.decode(code, address, at);
    if (!insn) return std::nullopt;
    const cs_x86& x = insn->detail->x86;
    if (insn->id == X86_INS_PUSH && x.op_count == 1 && x.operands[0].size == 8) {
      depth += 8;
    } else if (insn->id == X86_INS_SUB && x.op_count == 2 && x.operands[0].type == X86_OP_REG &&
               x.operands[0].reg == X86_REG_RSP && x.operands[1].type == X86_OP_IMM && x.operands[1].imm >= 0) {
      depth += static_cast<uint64_t>(x.operands[1].imm);
    } else {
      cs_regs read, written;
      uint8_t nread = 0, nwritten = 0;
      if (cs_regs_access(d.handle(), insn, read, &nread, written, &nwritten) != CS_ERR_OK) return std::nullopt;
      for (uint8_t i = 0; i < nwritten; ++i)
        if (written[i] == X86_REG_RSP) return std::nullopt;
      if (is_branch(d.handle(), *insn)) return std::nullopt;
    }
    at += insn->size;
  }
  return depth;
}

}  // namespace hotfix::arch
