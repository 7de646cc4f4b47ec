// Capstone decoding shared by the x86-64 analyses (entry checks, clobber sets, exits).
#pragma once
#include <capstone/capstone.h>
#include <fmt/format.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace hotfix::arch {
inline namespace x86_64_decoding {

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

inline std::string text(const cs_insn& insn) {
  return insn.op_str[0] ? fmt::format("{} {}", insn.mnemonic, insn.op_str) : std::string(insn.mnemonic);
}

inline bool is_branch(csh h, const cs_insn& insn) {
  // xbegin's operand is the abort handler: control can land there like a jump target.
  return cs_insn_group(h, &insn, CS_GRP_JUMP) || cs_insn_group(h, &insn, CS_GRP_CALL) ||
         insn.id == X86_INS_XBEGIN;
}

// The target of a direct branch; nullopt for register/memory (indirect) targets.
inline std::optional<uint64_t> direct_target(const cs_insn& insn) {
  const cs_x86& x = insn.detail->x86;
  if (x.op_count >= 1 && x.operands[0].type == X86_OP_IMM) return static_cast<uint64_t>(x.operands[0].imm);
  return std::nullopt;
}

}  // namespace x86_64_decoding
}  // namespace hotfix::arch
