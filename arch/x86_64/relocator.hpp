// A small x86-64 instruction relocator (after frida-gum's GumX86Relocator): reads whole
// instructions at one address and writes them, through a Writer, to run at another with the
// same effect. Position-dependent instructions are rewritten:
//   - a rip-relative memory operand gets the displacement that reaches the same byte;
//   - jmp/jcc rel8 and rel32 and call rel32 become their rel32 forms to the same target (or
//     an absolute sequence, see Writer) -- rel8 is widened because the target moved away;
// and what cannot be moved is refused with the reason: a branch into the moved bytes (its
// target now holds the entry jump), loop/jrcxz (rel8 only, no wider form), xbegin, and a
// rip-relative operand whose target is beyond a rel32 from the new place.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "arch/x86_64/writer.hpp"
#include "common/error.hpp"

namespace hotfix::arch::x86 {

class Relocator {
 public:
  Relocator(std::span<const uint8_t> input, uint64_t input_pc) : input_(input), input_pc_(input_pc) {}

  // Decode the next whole instruction; returns the input bytes read so far.
  Result<size_t> read_one();
  // Write every instruction read so far to `out` (at out.pc()).
  Result<void> write_all(Writer& out) const;

  size_t consumed() const { return consumed_; }
  // A moved call returns to the original code after it (Writer::call_returning_to) instead of
  // to the moved copy. Right only where the code after the call is intact: past the bytes an
  // entry jump covers, which is where a call among them always ends (it is the last one).
  void keep_return_addresses(bool on) { keep_return_addresses_ = on; }
  std::string disasm() const;  // "push rbp; lea rax, [rip + 0x10]"

  // One decoded instruction and what makes it position-dependent.
  struct Insn {
    enum class Kind { plain, rip_relative, jmp, jcc, call, unmovable };
    Kind kind = Kind::plain;
    uint64_t address = 0;
    std::vector<uint8_t> bytes;
    std::string text;
    uint64_t target = 0;       // jmp/jcc/call: the branch target; rip_relative: the byte addressed
    uint8_t disp_offset = 0;   // rip_relative: where the disp32 sits in `bytes`
    Cond cond = Cond::o;       // jcc
    std::string why;           // unmovable: the reason
  };

 private:
  Result<void> write_one(Writer& out, const Insn& insn) const;
  std::span<const uint8_t> input_;
  uint64_t input_pc_ = 0;
  size_t consumed_ = 0;
  bool keep_return_addresses_ = false;
  std::vector<Insn> insns_;
};

}  // namespace hotfix::arch::x86
