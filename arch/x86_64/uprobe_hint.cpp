// Which first instructions the kernel's x86 uprobes refuse (arch/x86/kernel/uprobes.c:
// uprobe_init_insn), for the attach layer's hint. Seen on Debian's libc and libcrypto: the
// `lock`-prefixed reference counters (`lock addl $1, 0x20(%rdi)`) and AVX entries of the
// string functions (`vmovd %esi, %xmm0`, `vpxor ...`) come back ENOTSUPP.
#include "arch/arch.hpp"

namespace hotfix::arch {

namespace {

bool is_refused_prefix(uint8_t b) {
  return b == 0xf0 /* lock */ || b == 0x26 || b == 0x2e || b == 0x36 || b == 0x3e /* ES CS SS DS */;
}
bool is_other_prefix(uint8_t b) {
  return b == 0x66 || b == 0x67 || b == 0xf2 || b == 0xf3 || b == 0x64 || b == 0x65 || (b >= 0x40 && b <= 0x4f);
}

}  // namespace

bool uprobe_likely_refused(std::span<const uint8_t> code) {
  size_t i = 0;
  for (; i < code.size() && i < 15; ++i) {
    if (is_refused_prefix(code[i])) return true;
    if (!is_other_prefix(code[i])) break;
  }
  if (i >= code.size()) return false;
  uint8_t op = code[i];
  // In 64-bit mode c4/c5 always start a VEX prefix and 62 an EVEX one; cc is int3.
  return op == 0xc4 || op == 0xc5 || op == 0x62 || op == 0xcc;
}

}  // namespace hotfix::arch
