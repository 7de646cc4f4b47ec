// Moving whole instructions to another address (relocator.hpp), and the counting trampoline
// built from it (arch.hpp).
#include "arch/x86_64/relocator.hpp"

#include <capstone/capstone.h>
#include <fmt/ranges.h>

#include <cstring>

#include "arch/arch.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch::x86 {
namespace {

using Kind = Relocator::Insn::Kind;

bool is_jcc(unsigned id) {
  switch (id) {
    case X86_INS_JO: case X86_INS_JNO: case X86_INS_JB: case X86_INS_JAE:
    case X86_INS_JE: case X86_INS_JNE: case X86_INS_JBE: case X86_INS_JA:
    case X86_INS_JS: case X86_INS_JNS: case X86_INS_JP: case X86_INS_JNP:
    case X86_INS_JL: case X86_INS_JGE: case X86_INS_JLE: case X86_INS_JG:
      return true;
    default:
      return false;
  }
}

bool is_rel8_only(unsigned id) {
  return id == X86_INS_JRCXZ || id == X86_INS_JECXZ || id == X86_INS_JCXZ || id == X86_INS_LOOP ||
         id == X86_INS_LOOPE || id == X86_INS_LOOPNE;
}

// The condition of a Jcc from its opcode: 70+cc (rel8) or 0F 80+cc (rel32).
Cond condition_of(const cs_x86& x) {
  uint8_t op = x.opcode[0] == 0x0f ? x.opcode[1] : x.opcode[0];
  return static_cast<Cond>(op & 0x0f);
}

Relocator::Insn classify(const cs_insn& i) {
  Relocator::Insn out;
  out.address = i.address;
  out.bytes.assign(i.bytes, i.bytes + i.size);
  out.text = text(i);
  const cs_x86& x = i.detail->x86;
  bool imm = x.op_count >= 1 && x.operands[0].type == X86_OP_IMM;
  if (is_rel8_only(i.id)) {
    out.kind = Kind::unmovable;
    out.why = fmt::format("`{}` has only an 8-bit displacement and no wider form", out.text);
  } else if (i.id == X86_INS_XBEGIN) {
    out.kind = Kind::unmovable;
    out.why = fmt::format("`{}` names an abort handler relative to itself", out.text);
  } else if (imm && i.id == X86_INS_JMP) {
    out.kind = Kind::jmp, out.target = static_cast<uint64_t>(x.operands[0].imm);
  } else if (imm && i.id == X86_INS_CALL) {
    out.kind = Kind::call, out.target = static_cast<uint64_t>(x.operands[0].imm);
  } else if (imm && is_jcc(i.id)) {
    out.kind = Kind::jcc, out.target = static_cast<uint64_t>(x.operands[0].imm), out.cond = condition_of(x);
  } else {
    for (uint8_t k = 0; k < x.op_count; ++k) {
      const cs_x86_op& op = x.operands[k];
      if (op.type != X86_OP_MEM || op.mem.base != X86_REG_RIP) continue;
      if (x.encoding.disp_size != 4 || x.encoding.disp_offset == 0) {
        out.kind = Kind::unmovable;
        out.why = fmt::format("`{}` addresses memory relative to the pc in a form hotfix cannot re-encode", out.text);
        break;
      }
      out.kind = Kind::rip_relative;
      out.target = i.address + i.size + static_cast<uint64_t>(op.mem.disp);
      out.disp_offset = x.encoding.disp_offset;
      break;
    }
  }
  return out;
}

}  // namespace

Result<size_t> Relocator::read_one() {
  thread_local Decoder d;  // opening Capstone costs more than moving a few instructions
  if (!d.ok()) return fail("Capstone cannot open an x86-64 decoder");
  if (consumed_ >= input_.size())
    return fail(fmt::format("no instruction to move at {:#x}: the {}-byte input ends there", input_pc_ + consumed_,
                            input_.size()));
  const cs_insn* i = d.decode(input_, input_pc_, consumed_);
  if (!i)
    return fail(fmt::format("the bytes at {:#x} do not decode as a whole instruction", input_pc_ + consumed_));
  insns_.push_back(classify(*i));
  consumed_ += i->size;
  return consumed_;
}

std::string Relocator::disasm() const {
  std::vector<std::string> t;
  for (auto& i : insns_) t.push_back(i.text);
  return fmt::format("{}", fmt::join(t, "; "));
}

Result<void> Relocator::write_all(Writer& out) const {
  for (auto& i : insns_) HOTFIX_CHECK(write_one(out, i));
  return {};
}

Result<void> Relocator::write_one(Writer& out, const Insn& i) const {
  uint64_t begin = input_pc_, end = input_pc_ + consumed_;
  bool branch = i.kind == Kind::jmp || i.kind == Kind::jcc || i.kind == Kind::call;
  // The first byte is fine: a branch to it lands on whatever now sits at the entry, which is
  // where the original would have gone too. Any other moved byte now holds part of that.
  if (branch && i.target > begin && i.target < end)
    return fail(fmt::format("`{}` at {:#x} branches to {:#x}, inside the {} bytes being moved", i.text, i.address,
                            i.target, consumed_));
  switch (i.kind) {
    case Kind::unmovable:
      return fail(fmt::format("cannot move the instruction at {:#x}: {}", i.address, i.why));
    case Kind::jmp: out.jmp(i.target); return {};
    case Kind::call:
      if (keep_return_addresses_ && i.address + i.bytes.size() >= end) out.call_returning_to(i.address + i.bytes.size(), i.target);
      else out.call(i.target);
      return {};
    case Kind::jcc: out.jcc(i.cond, i.target); return {};
    case Kind::rip_relative: {
      auto disp = rel32(out.pc() + i.bytes.size(), i.target);
      if (!disp)
        return fail(fmt::format("`{}` at {:#x} addresses {:#x}, beyond a 32-bit displacement from {:#x}", i.text,
                                i.address, i.target, out.pc()));
      std::vector<uint8_t> bytes = i.bytes;
      std::memcpy(bytes.data() + i.disp_offset, &*disp, 4);
      out.put_bytes(bytes);
      return {};
    }
    case Kind::plain: out.put_bytes(i.bytes); return {};
  }
  return {};
}

}  // namespace hotfix::arch::x86

namespace hotfix::arch {

Result<Relocation> relocate(std::span<const uint8_t> code, uint64_t from, uint64_t to, size_t min_bytes) {
  x86::Relocator r(code, from);
  while (r.consumed() < min_bytes) HOTFIX_CHECK(r.read_one());
  x86::Writer w(to);
  HOTFIX_CHECK(r.write_all(w));
  return Relocation{w.code(), r.consumed(), r.disasm()};
}

size_t relocated_max_size(size_t min_bytes) {
  // At most min_bytes instructions begin in the first min_bytes bytes; each becomes at most
  // one 15-byte copy or one absolute branch sequence.
  return min_bytes * x86::Writer::kMaxBranchSize;
}

// lock inc qword [rip+disp] when the counter is in reach: no register touched. Else the
// counting island's push rax; movabs rax, counter; lock inc qword [rax]; pop rax (the slot
// below rsp belongs to the callee at an entry). Flags are dead at a function entry.
Result<CountingTrampoline> encode_counting_trampoline(std::span<const uint8_t> code, uint64_t fn, uint64_t at,
                                                      uint64_t counter) {
  EntryCheck check = check_entry(code, fn);
  if (!check.patchable) return fail(check.reason);
  x86::Writer w(at);
  if (!w.lock_inc_qword_ptr_rip(counter)) {
    w.push_rax();
    w.mov_rax_u64(counter);
    w.lock_inc_qword_ptr_rax();
    w.pop_rax();
  }
  x86::Relocator r(code, fn);
  r.keep_return_addresses(true);  // a C++ exception, an unwinder or a stack scan sees the function's own frame
  while (r.consumed() < entry_jump_size()) HOTFIX_CHECK(r.read_one());
  HOTFIX_CHECK(r.write_all(w));
  w.jmp(fn + r.consumed());
  if (w.code().size() > counting_trampoline_max_size())
    return fail(fmt::format("internal error: a {}-byte counting trampoline", w.code().size()));
  return CountingTrampoline{w.code(), r.consumed(), r.disasm()};
}

size_t counting_trampoline_max_size() {
  return 16 + relocated_max_size(entry_jump_size()) + x86::Writer::kMaxCallReturningToSize +
         x86::Writer::kMaxBranchSize;
}

}  // namespace hotfix::arch
