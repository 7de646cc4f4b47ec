// A small x86-64 instruction writer (after frida-gum's GumX86Writer): emits encoded
// instructions into a byte buffer. Only what hotfix's generated code needs; each method
// encodes exactly one instruction.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace hotfix::arch::x86 {

class Writer {
 public:
  // mov [rsp + disp8], rax
  void mov_rsp_offset_rax(int8_t disp);
  // mov eax, imm32 (zero-extends into rax)
  void mov_eax_u32(uint32_t imm);
  // mov rax, simm32 (sign-extended): the form glibc's __restore_rt uses
  void mov_rax_s32(int32_t imm);
  void syscall();
  void ret();
  void int3();
  void put_bytes(const std::vector<uint8_t>& bytes) { code_.insert(code_.end(), bytes.begin(), bytes.end()); }

  size_t offset() const { return code_.size(); }
  const std::vector<uint8_t>& code() const { return code_; }

 private:
  void put_u32(uint32_t v);
  std::vector<uint8_t> code_;
};

}  // namespace hotfix::arch::x86
