#include "arch/x86_64/writer.hpp"

#include <limits>

namespace hotfix::arch::x86 {

std::optional<int32_t> rel32(uint64_t end, uint64_t target) {
  // User-space addresses are below 2^63: the signed difference cannot overflow.
  int64_t rel = static_cast<int64_t>(target) - static_cast<int64_t>(end);
  if (rel < std::numeric_limits<int32_t>::min() || rel > std::numeric_limits<int32_t>::max()) return std::nullopt;
  return static_cast<int32_t>(rel);
}

void Writer::put_u32(uint32_t v) {
  for (int b = 0; b < 4; ++b) code_.push_back(static_cast<uint8_t>(v >> (8 * b)));
}

void Writer::put_u64(uint64_t v) {
  for (int b = 0; b < 8; ++b) code_.push_back(static_cast<uint8_t>(v >> (8 * b)));
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

void Writer::mov_rax_u64(uint64_t imm) {
  code_.insert(code_.end(), {0x48, 0xb8});  // REX.W B8+rax
  put_u64(imm);
}

void Writer::push_rax() { code_.push_back(0x50); }
void Writer::pop_rax() { code_.push_back(0x58); }
void Writer::lock_inc_qword_ptr_rax() { code_.insert(code_.end(), {0xf0, 0x48, 0xff, 0x00}); }

bool Writer::lock_inc_qword_ptr_rip(uint64_t target) {
  // lock REX.W FF /0, ModRM mod=00 rm=101 (rip+disp32): 8 bytes, the disp counts from its end
  auto disp = rel32(pc() + 8, target);
  if (!disp) return false;
  code_.insert(code_.end(), {0xf0, 0x48, 0xff, 0x05});
  put_u32(static_cast<uint32_t>(*disp));
  return true;
}

void Writer::syscall() { code_.insert(code_.end(), {0x0f, 0x05}); }
void Writer::ret() { code_.push_back(0xc3); }
void Writer::int3() { code_.push_back(0xcc); }

void Writer::jmp_absolute(uint64_t target) {
  code_.insert(code_.end(), {0xff, 0x25, 0x00, 0x00, 0x00, 0x00});  // jmp [rip+0]
  put_u64(target);
}

void Writer::jmp(uint64_t target) {
  if (auto disp = rel32(pc() + 5, target)) {
    code_.push_back(0xe9);
    put_u32(static_cast<uint32_t>(*disp));
    return;
  }
  jmp_absolute(target);
}

void Writer::call(uint64_t target) {
  if (auto disp = rel32(pc() + 5, target)) {
    code_.push_back(0xe8);
    put_u32(static_cast<uint32_t>(*disp));
    return;
  }
  // The return address is the `jmp .+8` right after the call: it steps over the quad.
  code_.insert(code_.end(), {0xff, 0x15, 0x02, 0x00, 0x00, 0x00, 0xeb, 0x08});  // call [rip+2]; jmp .+8
  put_u64(target);
}

void Writer::call_returning_to(uint64_t return_to, uint64_t target) {
  code_.insert(code_.end(), {0x48, 0x8d, 0x64, 0x24, 0xf8});  // lea rsp, [rsp-8]
  push_rax();
  mov_rax_u64(return_to);
  mov_rsp_offset_rax(8);
  pop_rax();
  jmp(target);
}

void Writer::jcc(Cond cc, uint64_t target) {
  if (auto disp = rel32(pc() + 6, target)) {
    code_.insert(code_.end(), {0x0f, static_cast<uint8_t>(0x80 | static_cast<uint8_t>(cc))});
    put_u32(static_cast<uint32_t>(*disp));
    return;
  }
  // Not taken: skip the 14-byte absolute jump.
  code_.insert(code_.end(), {static_cast<uint8_t>(0x70 | static_cast<uint8_t>(invert(cc))), 14});
  jmp_absolute(target);
}

}  // namespace hotfix::arch::x86
