// Which call-clobbered registers a function's own code changes (see arch.hpp: GCC's -fipa-ra).
// Following its calls is the engine's job (it knows where code lives and caches the answers).
#include <array>

#include "arch/arch.hpp"
#include "arch/x86_64/callregs.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {
namespace {

constexpr std::array<const char*, 9> kIntNames = {"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"};

uint64_t single_reg_operand(const cs_insn& insn) {
  const cs_x86& x = insn.detail->x86;
  return x.op_count == 1 && x.operands[0].type == X86_OP_REG ? reg_bits(x.operands[0].reg) : 0;
}

}  // namespace

uint64_t call_clobbered_registers() { return kAllBits; }
uint64_t argument_registers() { return kArgs; }

ClobberScan scan_clobbers(std::span<const uint8_t> code, uint64_t address) {
  Decoder d;
  ClobberScan out;
  uint64_t pushed = 0, popped = 0;
  const uint64_t end = address + code.size();
  for (size_t off = 0; off < code.size();) {
    const cs_insn* insn = d.ok() ? d.decode(code, address, off) : nullptr;
    if (!insn) {  // data or padding: we cannot see past it
      out.undecodable = true;
      break;
    }
    cs_regs reads, writes;
    uint8_t nreads = 0, nwrites = 0;
    if (cs_regs_access(d.handle(), insn, reads, &nreads, writes, &nwrites) == CS_ERR_OK)
      for (int i = 0; i < nwrites; ++i) out.written |= reg_bits(writes[i]);
    if (insn->id == X86_INS_PUSH) pushed |= single_reg_operand(*insn);
    if (insn->id == X86_INS_POP) popped |= single_reg_operand(*insn);
    bool call = insn->id == X86_INS_CALL;
    bool jump = cs_insn_group(d.handle(), insn, CS_GRP_JUMP);
    if (call || jump) {
      if (auto to = direct_target(*insn)) {
        if (*to < address || *to >= end) out.calls.push_back(*to);  // a call, or a tail call out
      } else {
        (call ? out.indirect_calls : out.indirect_jumps) = true;
      }
    }
    if (insn->id == X86_INS_SYSCALL) out.written |= kRax | kRcx | kR11;
    off += insn->size;
  }
  // Registers pushed and popped back (GCC's -fcall-saved-REG prologue and epilogue) are
  // preserved; a `push rax` ... `pop rdx` pair for stack alignment preserves neither.
  out.preserved = pushed & popped;
  return out;
}

std::string register_names(uint64_t bits) {
  std::string s;
  for (int b = 0; b < kVectorBase + 16; ++b) {
    if (!(bits >> b & 1)) continue;
    s += s.empty() ? "" : ", ";
    s += b < kVectorBase ? std::string(kIntNames[b]) : fmt::format("xmm{}", b - kVectorBase);
  }
  return s;
}

uint64_t saved_by_gcc_flag() { return kRcx | kRsi | kRdi | kR8 | kR9 | kR10 | kR11; }

std::string register_flags(uint64_t bits) {
  std::string s;
  for (int b = 0; b < kVectorBase; ++b)
    if (bits >> b & 1) s += fmt::format("{}-fcall-saved-{}", s.empty() ? "" : " ", kIntNames[b]);
  return s;
}

}  // namespace hotfix::arch
