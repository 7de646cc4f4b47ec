// Prologue analysis with Capstone: may a 5-byte jump overwrite this function's entry?
#include <capstone/capstone.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>

#include "arch/arch.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {
namespace {

bool uses_rip(const cs_insn& insn) {
  const cs_x86& x = insn.detail->x86;
  return std::any_of(x.operands, x.operands + x.op_count,
                     [](const cs_x86_op& op) { return op.type == X86_OP_MEM && op.mem.base == X86_REG_RIP; });
}

// Why the bytes at `offset` don't decode: truncated by the end of the function, or invalid.
std::string undecodable_reason(Decoder& d, std::span<const uint8_t> code, uint64_t address, size_t offset) {
  std::array<uint8_t, kMaxInsnSize> padded{};
  size_t left = std::min(code.size() - offset, padded.size());
  std::copy_n(code.begin() + offset, left, padded.begin());
  if (const cs_insn* i = d.decode(padded, address + offset, 0); i && i->size > left)
    return fmt::format("the instruction at +{} runs past the end of the {}-byte function", offset, code.size());
  return fmt::format("the bytes at +{} (0x{:x}) under the entry jump are not a valid instruction", offset,
                     address + offset);
}

EntryCheck refuse(EntryCheck c, std::string reason) {
  c.patchable = false;
  c.reason = std::move(reason);
  return c;
}

}  // namespace

EntryCheck check_entry(std::span<const uint8_t> code, uint64_t address) {
  EntryCheck c;
  thread_local Decoder d;  // opening Capstone costs more than checking a typical function
  if (!d.ok()) return refuse(c, "Capstone cannot open an x86-64 decoder");
  if (code.size() < entry_jump_size())
    return refuse(c, fmt::format("the {}-byte function is shorter than the {}-byte entry jump", code.size(),
                                 entry_jump_size()));

  // The whole instructions the jump overwrites (at least entry_jump_size() bytes).
  std::vector<std::string> covered_text;
  while (c.covered < entry_jump_size()) {
    const cs_insn* insn = d.decode(code, address, c.covered);
    if (!insn) return refuse(c, undecodable_reason(d, code, address, c.covered));
    covered_text.push_back(text(*insn));
    c.rip_relative |= uses_rip(*insn);
    c.covered += insn->size;
  }
  c.disasm = fmt::format("{}", fmt::join(covered_text, "; "));

  // Linear sweep of the whole function for branches into the overwritten bytes. A branch to
  // the entry itself is fine: it lands on our jump. Bytes that don't decode after the covered
  // range are data or padding; skip them a byte at a time.
  size_t skipped = 0;
  for (size_t offset = 0; offset < code.size();) {
    const cs_insn* insn = d.decode(code, address, offset);
    if (!insn) {
      ++skipped, ++offset;
      continue;
    }
    if (is_branch(d.handle(), *insn)) {
      auto target = direct_target(*insn);
      // An indirect call leaves the function; an indirect jump (a jump table) may not.
      if (!target) c.indirect_branches |= cs_insn_group(d.handle(), insn, CS_GRP_JUMP);
      else if (*target > address && *target < address + c.covered)
        return refuse(c, fmt::format("`{}` at +{} branches to +{}, inside the {} bytes the entry jump overwrites",
                                     text(*insn), offset, *target - address, c.covered));
    }
    offset += insn->size;
  }

  std::vector<std::string> notes;
  if (c.rip_relative) notes.push_back("the overwritten instructions are pc-relative (matters only for a trampoline)");
  if (c.indirect_branches) notes.push_back("indirect branches in the function were not checked");
  if (skipped) notes.push_back(fmt::format("{} bytes in the function did not decode and were skipped", skipped));
  c.note = fmt::format("{}", fmt::join(notes, "; "));
  c.patchable = true;
  return c;
}

std::string check_branches_into_entry(std::span<const uint8_t> code, uint64_t address, uint64_t entry,
                                      size_t covered) {
  thread_local Decoder d;
  if (!d.ok()) return "Capstone cannot open an x86-64 decoder";
  for (size_t offset = 0; offset < code.size();) {
    const cs_insn* insn = d.decode(code, address, offset);
    if (!insn) {  // data or padding: a byte at a time, as check_entry does
      ++offset;
      continue;
    }
    if (is_branch(d.handle(), *insn))
      if (auto target = direct_target(*insn); target && *target > entry && *target < entry + covered)
        return fmt::format("`{}` at {:#x} branches to +{}, inside the {} bytes the entry jump overwrites", text(*insn),
                           address + offset, *target - entry, covered);
    offset += insn->size;
  }
  return "";
}

bool branches_to(std::span<const uint8_t> code, uint64_t address, uint64_t target) {
  thread_local Decoder d;
  if (!d.ok()) return false;
  for (size_t offset = 0; offset < code.size();) {
    const cs_insn* insn = d.decode(code, address, offset);
    if (!insn) {
      ++offset;
      continue;
    }
    if (is_branch(d.handle(), *insn) && direct_target(*insn) == target) return true;
    offset += insn->size;
  }
  return false;
}

std::string disassemble(std::span<const uint8_t> code, uint64_t address, size_t max_insns) {
  thread_local Decoder d;  // opening Capstone costs more than checking a typical function
  if (!d.ok()) return "(Capstone cannot open an x86-64 decoder)\n";
  std::string out;
  size_t offset = 0;
  for (size_t n = 0; n < max_insns && offset < code.size(); ++n) {
    const cs_insn* insn = d.decode(code, address, offset);
    if (!insn) {
      out += fmt::format("0x{:x}: (bad)\n", address + offset);
      break;
    }
    out += fmt::format("0x{:x}: {}\n", insn->address, text(*insn));
    offset += insn->size;
  }
  return out;
}

}  // namespace hotfix::arch
