#include "arch/x86_64/writer.hpp"

namespace hotfix::arch::x86 {

void Writer::put_u32(uint32_t v) {
  for (int b = 0; b < 4; ++b) code_.push_back(static_cast<uint8_t>(v >> (8 * b)));
}

void Writer::mov_rsp_offset_rax(int8_t disp) {
  // REX.W 89 /r, ModRM mod=01 reg=rax rm=100 (SIB), SIB base=rsp index=none, disp8
  code_.insert(code_.end(), {0x48, 0x89, 0x44, 0x24, static_cast<uint8_t>(disp)});
}

void Writer::mov_eax_u32(uint32_t imm) {
  code_.push_back(0xb8);
  put_u32(imm);
}

void Writer::mov_rax_s32(int32_t imm) {
  code_.insert(code_.end(), {0x48, 0xc7, 0xc0});
  put_u32(static_cast<uint32_t>(imm));
}

void Writer::syscall() { code_.insert(code_.end(), {0x0f, 0x05}); }
void Writer::ret() { code_.push_back(0xc3); }
void Writer::int3() { code_.push_back(0xcc); }

}  // namespace hotfix::arch::x86
