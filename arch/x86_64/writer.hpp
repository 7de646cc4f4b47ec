// A small x86-64 instruction writer (after frida-gum's GumX86Writer): emits encoded
// instructions into a byte buffer that will run at `pc()` in the target. Each method encodes
// exactly one instruction, or, for a branch beyond a rel32's reach, the shortest absolute
// sequence that does the same. Only what hotfix's generated code needs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace hotfix::arch::x86 {

// Condition codes as the low nibble of Jcc's opcode (0x70+cc short, 0F 80+cc near).
enum class Cond : uint8_t { o, no, b, ae, e, ne, be, a, s, ns, p, np, l, ge, le, g };
inline Cond invert(Cond c) { return static_cast<Cond>(static_cast<uint8_t>(c) ^ 1); }

// rel32 from the end of an instruction at `end` to `target`, if it fits.
std::optional<int32_t> rel32(uint64_t end, uint64_t target);

class Writer {
 public:
  explicit Writer(uint64_t pc = 0) : base_(pc) {}

  // mov [rsp + disp8], rax
  void mov_rsp_offset_rax(int8_t disp);
  // mov eax, imm32 (zero-extends into rax)
  void mov_eax_u32(uint32_t imm);
  // mov rax, simm32 (sign-extended): the form glibc's __restore_rt uses
  void mov_rax_s32(int32_t imm);
  // movabs rax, imm64
  void mov_rax_u64(uint64_t imm);
  void push_rax();
  void pop_rax();
  // lock inc qword [rax]
  void lock_inc_qword_ptr_rax();
  // lock inc qword [rip + disp32] addressing `target`; false (nothing written) if out of reach
  bool lock_inc_qword_ptr_rip(uint64_t target);
  void syscall();
  void ret();
  void int3();

  // Branches to an absolute address. Within a rel32's reach: jmp/call/jcc rel32. Beyond:
  //   jmp  -> jmp [rip+0]; .quad target                         (14 bytes)
  //   call -> call [rip+2]; jmp .+8; .quad target               (16 bytes, returns after it)
  //   jcc  -> j!cc .+14; jmp [rip+0]; .quad target              (16 bytes)
  void jmp(uint64_t target);
  void call(uint64_t target);
  // A call made from moved code that returns where the original call would have: pushes
  // `return_to` (no register or flag changed) and jumps to `target`, so the return address on
  // the stack is the original code's -- unwinders, C++ exceptions and stack scans see the
  // function they expect, and no thread is ever left with a return address in moved code.
  //   lea rsp, [rsp-8]; push rax; movabs rax, return_to; mov [rsp+8], rax; pop rax; jmp target
  void call_returning_to(uint64_t return_to, uint64_t target);
  void jcc(Cond cc, uint64_t target);
  // jmp [rip+0]; .quad target, whatever the distance (the island jump)
  void jmp_absolute(uint64_t target);

  void put_bytes(std::span<const uint8_t> bytes) { code_.insert(code_.end(), bytes.begin(), bytes.end()); }
  void put_u32(uint32_t v);
  void put_u64(uint64_t v);

  uint64_t pc() const { return base_ + code_.size(); }
  size_t offset() const { return code_.size(); }
  const std::vector<uint8_t>& code() const { return code_; }

  // Longest sequence jmp/call/jcc emits (the absolute forms).
  static constexpr size_t kMaxBranchSize = 16;
  static constexpr size_t kMaxCallReturningToSize = 22 + 14;

 private:
  uint64_t base_ = 0;
  std::vector<uint8_t> code_;
};

}  // namespace hotfix::arch::x86
