// Which call-clobbered registers a function may change (see arch.hpp: GCC's -fipa-ra).
#include <array>
#include <set>

#include "arch/arch.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {
namespace {

// Call-clobbered registers of the System V x86-64 ABI: bit 0..8 integer, 9..24 vector.
constexpr std::array<const char*, 9> kIntNames = {"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"};
constexpr int kVectorBase = 9;
constexpr uint64_t kAllBits = (1ull << (kVectorBase + 16)) - 1;

// The bit of a (sub)register, or -1 when it is not call-clobbered.
int clobber_bit(x86_reg r) {
  switch (r) {
    case X86_REG_RAX: case X86_REG_EAX: case X86_REG_AX: case X86_REG_AL: case X86_REG_AH: return 0;
    case X86_REG_RCX: case X86_REG_ECX: case X86_REG_CX: case X86_REG_CL: case X86_REG_CH: return 1;
    case X86_REG_RDX: case X86_REG_EDX: case X86_REG_DX: case X86_REG_DL: case X86_REG_DH: return 2;
    case X86_REG_RSI: case X86_REG_ESI: case X86_REG_SI: case X86_REG_SIL: return 3;
    case X86_REG_RDI: case X86_REG_EDI: case X86_REG_DI: case X86_REG_DIL: return 4;
    case X86_REG_R8: case X86_REG_R8D: case X86_REG_R8W: case X86_REG_R8B: return 5;
    case X86_REG_R9: case X86_REG_R9D: case X86_REG_R9W: case X86_REG_R9B: return 6;
    case X86_REG_R10: case X86_REG_R10D: case X86_REG_R10W: case X86_REG_R10B: return 7;
    case X86_REG_R11: case X86_REG_R11D: case X86_REG_R11W: case X86_REG_R11B: return 8;
    default: break;
  }
  if (r >= X86_REG_XMM0 && r <= X86_REG_XMM15) return kVectorBase + (r - X86_REG_XMM0);
  if (r >= X86_REG_YMM0 && r <= X86_REG_YMM15) return kVectorBase + (r - X86_REG_YMM0);
  if (r >= X86_REG_ZMM0 && r <= X86_REG_ZMM15) return kVectorBase + (r - X86_REG_ZMM0);
  return -1;
}

bool leaves_function(const cs_insn& insn) {
  return insn.id == X86_INS_CALL || insn.id == X86_INS_JMP;
}

}  // namespace

ClobberSet clobbered_registers(std::span<const uint8_t> code, uint64_t address, const CodeLookup& callee, int depth) {
  Decoder d;
  ClobberSet out;
  uint64_t written = 0, pushed = 0, popped = 0;
  for (size_t off = 0; off < code.size();) {
    const cs_insn* insn = d.decode(code, address, off);
    if (!insn) {  // data or padding: we cannot see past it, so assume the worst
      out.all = true;
      break;
    }
    cs_regs reads, writes;
    uint8_t nreads = 0, nwrites = 0;
    if (cs_regs_access(d.handle(), insn, reads, &nreads, writes, &nwrites) == CS_ERR_OK)
      for (int i = 0; i < nwrites; ++i)
        if (int bit = clobber_bit(static_cast<x86_reg>(writes[i])); bit >= 0) written |= 1ull << bit;
    if (insn->id == X86_INS_PUSH && insn->detail->x86.op_count == 1 && insn->detail->x86.operands[0].type == X86_OP_REG)
      if (int bit = clobber_bit(insn->detail->x86.operands[0].reg); bit >= 0) pushed |= 1ull << bit;
    if (insn->id == X86_INS_POP && insn->detail->x86.op_count == 1 && insn->detail->x86.operands[0].type == X86_OP_REG)
      if (int bit = clobber_bit(insn->detail->x86.operands[0].reg); bit >= 0) popped |= 1ull << bit;
    if (leaves_function(*insn)) {
      auto target = direct_target(*insn);
      bool inside = target && *target >= address && *target < address + code.size();
      if (!inside) {
        std::optional<CodeAt> next = target && depth > 0 ? callee(*target) : std::nullopt;
        ClobberSet sub = next ? clobbered_registers(next->bytes, next->address, callee, depth - 1) : ClobberSet{0, true};
        out.all |= sub.all;
        written |= sub.bits;
      }
    }
    off += insn->size;
  }
  // Registers pushed and popped back (GCC's -fcall-saved-REG prologue and epilogue) are
  // preserved; a `push rax` ... `pop rdx` pair for stack alignment preserves neither.
  pushed &= popped;
  if (out.all) {
    out.all = pushed == 0;
    out.bits = kAllBits & ~pushed;
  } else {
    out.bits = written & ~pushed;
  }
  return out;
}

uint64_t clobber_excess(const ClobberSet& original, const ClobberSet& replacement) {
  if (original.all) return 0;  // callers could not assume anything was preserved
  uint64_t changed = replacement.all ? kAllBits : replacement.bits;
  return changed & ~original.bits;
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

std::string preserve_flags(uint64_t bits) {
  std::string s;
  for (int b = 0; b < kVectorBase + 16; ++b) {
    if (!(bits >> b & 1)) continue;
    s += s.empty() ? "" : " ";
    s += b < kVectorBase ? fmt::format("-fcall-saved-{}", kIntNames[b]) : fmt::format("-fcall-saved-xmm{}", b - kVectorBase);
  }
  return s;
}

}  // namespace hotfix::arch
