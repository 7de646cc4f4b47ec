// Exits of a function, with Capstone: every `ret`, and every jump that leaves the function
// (a tail call). A probe on each counts the calls that ran this code exactly once.
#include "arch/arch.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {
namespace {

enum class Leaves { no, yes, unknown };

bool is_return(const cs_insn& i) { return i.id == X86_INS_RET || i.id == X86_INS_RETF || i.id == X86_INS_RETFQ; }

// Does this unconditional jmp leave [begin, end)?
Leaves jmp_leaves(const cs_insn& i, uint64_t begin, uint64_t end) {
  const cs_x86& x = i.detail->x86;
  if (x.op_count < 1) return Leaves::unknown;
  const cs_x86_op& op = x.operands[0];
  if (op.type == X86_OP_IMM) {
    auto to = static_cast<uint64_t>(op.imm);
    return to >= begin && to < end ? Leaves::no : Leaves::yes;
  }
  // jmp [rip+got] or jmp [reg+disp] (a vtable): a tail call. An indexed operand is a jump table.
  if (op.type == X86_OP_MEM) return op.mem.index == X86_REG_INVALID ? Leaves::yes : Leaves::no;
  return Leaves::unknown;  // jmp reg: a switch (table in a register) or a tail call through a pointer
}

// A conditional jump out of the function (a conditional tail call): a probe would also fire
// when it is not taken, so it cannot be counted exactly.
bool conditional_exit(csh h, const cs_insn& i, uint64_t begin, uint64_t end) {
  if (!cs_insn_group(h, &i, CS_GRP_JUMP) || i.id == X86_INS_JMP) return false;
  const cs_x86& x = i.detail->x86;
  if (x.op_count < 1 || x.operands[0].type != X86_OP_IMM) return false;
  auto to = static_cast<uint64_t>(x.operands[0].imm);
  return to < begin || to >= end;
}

}  // namespace

ExitPoints exit_points(std::span<const uint8_t> code, uint64_t address) {
  ExitPoints out;
  Decoder d;
  if (!d.ok()) {
    out.decoded_all = false;
    return out;
  }
  const uint64_t end = address + code.size();
  for (size_t off = 0; off < code.size();) {
    const cs_insn* insn = d.decode(code, address, off);
    if (!insn) {
      out.decoded_all = false;
      break;
    }
    const cs_insn& i = *insn;
    if (is_return(i)) {
      out.offsets.push_back(off);
    } else if (i.id == X86_INS_JMP) {
      Leaves l = jmp_leaves(i, address, end);
      if (l == Leaves::yes) out.offsets.push_back(off);
      if (l == Leaves::unknown) ++out.unresolved;
    } else if (conditional_exit(d.handle(), i, address, end)) {
      ++out.unresolved;
    }
    off += i.size;
  }
  return out;
}

}  // namespace hotfix::arch
