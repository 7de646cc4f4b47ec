// Prologue analysis with Capstone: may a 5-byte jump overwrite this function's entry?
#include <capstone/capstone.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <array>

#include "arch/arch.hpp"

namespace hotfix::arch {
namespace {

constexpr size_t kMaxInsnSize = 15;

// One Capstone handle with instruction detail (for operands and groups), and one reusable
// instruction buffer.
class Decoder {
 public:
  Decoder() {
    if (cs_open(CS_ARCH_X86, CS_MODE_64, &handle_) != CS_ERR_OK) return;
    cs_option(handle_, CS_OPT_DETAIL, CS_OPT_ON);
    insn_ = cs_malloc(handle_);
  }
  ~Decoder() {
    if (insn_) cs_free(insn_, 1);
    if (handle_) cs_close(&handle_);
  }
  Decoder(const Decoder&) = delete;
  Decoder& operator=(const Decoder&) = delete;

  bool ok() const { return insn_ != nullptr; }
  csh handle() const { return handle_; }

  // The instruction at code[offset] (address + offset), or nullptr if the bytes don't decode.
  const cs_insn* decode(std::span<const uint8_t> code, uint64_t address, size_t offset) {
    const uint8_t* p = code.data() + offset;
    size_t left = code.size() - offset;
    uint64_t at = address + offset;
    return cs_disasm_iter(handle_, &p, &left, &at, insn_) ? insn_ : nullptr;
  }

 private:
  csh handle_ = 0;
  cs_insn* insn_ = nullptr;
};

std::string text(const cs_insn& insn) {
  return insn.op_str[0] ? fmt::format("{} {}", insn.mnemonic, insn.op_str) : std::string(insn.mnemonic);
}

bool is_branch(csh h, const cs_insn& insn) {
  // xbegin's operand is the abort handler: control can land there like a jump target.
  return cs_insn_group(h, &insn, CS_GRP_JUMP) || cs_insn_group(h, &insn, CS_GRP_CALL) ||
         insn.id == X86_INS_XBEGIN;
}

// The target of a direct branch; nullopt for register/memory (indirect) targets.
std::optional<uint64_t> direct_target(const cs_insn& insn) {
  const cs_x86& x = insn.detail->x86;
  if (x.op_count >= 1 && x.operands[0].type == X86_OP_IMM) return static_cast<uint64_t>(x.operands[0].imm);
  return std::nullopt;
}

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
