// The System V x86-64 call-clobbered registers as bits (arch.hpp's ClobberSet numbering),
// shared by the clobber scan (clobbers.cpp) and the call-site liveness (liveness.cpp).
#pragma once
#include <capstone/capstone.h>

#include <cstdint>

namespace hotfix::arch {
inline namespace x86_64_callregs {

// bit 0..8: rax rcx rdx rsi rdi r8 r9 r10 r11; bit 9..24: xmm0..xmm15 (ymm/zmm alias them).
constexpr int kVectorBase = 9;
constexpr uint64_t kAllBits = (1ull << (kVectorBase + 16)) - 1;
constexpr uint64_t bit(int b) { return 1ull << b; }
constexpr uint64_t kRax = bit(0), kRcx = bit(1), kRdx = bit(2), kRsi = bit(3), kRdi = bit(4), kR8 = bit(5),
                   kR9 = bit(6), kR10 = bit(7), kR11 = bit(8);
constexpr uint64_t kVector = kAllBits & ~((1ull << kVectorBase) - 1);
// Where a call may pass arguments: rdi, rsi, rdx, rcx, r8, r9 and xmm0..xmm7 (rax only
// carries a varargs count the caller always sets; r10 a static chain GCC sets too).
constexpr uint64_t kArgs = kRdi | kRsi | kRdx | kRcx | kR8 | kR9 | (((1ull << 8) - 1) << kVectorBase);

// The bit of a (sub)register, or -1 when it is not call-clobbered.
inline int clobber_bit(unsigned reg) {
  switch (reg) {
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
  if (reg >= X86_REG_XMM0 && reg <= X86_REG_XMM15) return kVectorBase + (reg - X86_REG_XMM0);
  if (reg >= X86_REG_YMM0 && reg <= X86_REG_YMM15) return kVectorBase + (reg - X86_REG_YMM0);
  if (reg >= X86_REG_ZMM0 && reg <= X86_REG_ZMM15) return kVectorBase + (reg - X86_REG_ZMM0);
  return -1;
}

inline uint64_t reg_bits(unsigned reg) {
  int b = clobber_bit(reg);
  return b < 0 ? 0 : bit(b);
}

// Does writing `reg` replace the whole register? A 32- or 64-bit write does (the upper half
// is zeroed); an 8- or 16-bit write merges with the old value, so the old value lives on.
inline bool full_gpr_write(unsigned reg) {
  switch (reg) {
    case X86_REG_AX: case X86_REG_AL: case X86_REG_AH: case X86_REG_CX: case X86_REG_CL: case X86_REG_CH:
    case X86_REG_DX: case X86_REG_DL: case X86_REG_DH: case X86_REG_SI: case X86_REG_SIL: case X86_REG_DI:
    case X86_REG_DIL: case X86_REG_R8W: case X86_REG_R8B: case X86_REG_R9W: case X86_REG_R9B: case X86_REG_R10W:
    case X86_REG_R10B: case X86_REG_R11W: case X86_REG_R11B: return false;
    default: return true;
  }
}

}  // namespace x86_64_callregs
}  // namespace hotfix::arch
