// Call sites and register liveness after them (see arch.hpp, "calling-convention check").
//
// Liveness is followed forward from where a call returns, over the code's control flow: a
// register is live when some path reads it before writing all of it. Capstone's read/write
// sets give each instruction's effect; calls, jumps and returns are handled here.
#include <algorithm>
#include <map>
#include <unordered_map>
#include <vector>

#include "arch/arch.hpp"
#include "arch/x86_64/callregs.hpp"
#include "arch/x86_64/decoder.hpp"

namespace hotfix::arch {
namespace {

int32_t rel32_at(std::span<const uint8_t> c, size_t i) {
  return static_cast<int32_t>(c[i] | c[i + 1] << 8 | c[i + 2] << 16 | static_cast<uint32_t>(c[i + 3]) << 24);
}

// ---- one instruction's effect on the call-clobbered registers ----
enum class Flow { next, call, jump, cond_jump, ret, stop, unknown };

struct Step {
  uint64_t address = 0, size = 0;
  uint64_t reads = 0, kills = 0;
  Flow flow = Flow::next;
  std::optional<uint64_t> target;  // direct call/jump target
  bool got_jump = false;           // jmp [rip+x] / jmp [reg+x] without index: a tail call through a pointer
  std::string text;
};

bool same_register_operands(const cs_x86& x) {
  if (x.op_count == 2) return x.operands[0].type == X86_OP_REG && x.operands[1].type == X86_OP_REG &&
                              x.operands[0].reg == x.operands[1].reg;
  if (x.op_count == 3)  // vpxor xmm0, xmm0, xmm0 -- only the sources matter
    return x.operands[1].type == X86_OP_REG && x.operands[2].type == X86_OP_REG &&
           x.operands[1].reg == x.operands[2].reg;
  return false;
}

// xor eax, eax and friends: the result does not depend on the register's old value.
bool zeroing_idiom(const cs_insn& i) {
  switch (i.id) {
    case X86_INS_XOR: case X86_INS_SUB: case X86_INS_SBB: case X86_INS_PXOR: case X86_INS_XORPS:
    case X86_INS_XORPD: case X86_INS_VPXOR: case X86_INS_VXORPS: case X86_INS_VXORPD: case X86_INS_PCMPEQD:
    case X86_INS_PCMPEQB: case X86_INS_PCMPEQW: case X86_INS_PCMPEQQ: case X86_INS_PSUBD: case X86_INS_PSUBQ:
      return same_register_operands(i.detail->x86);
    default: return false;
  }
}

bool vex_encoded(const cs_insn& i) {
  return i.size > 0 && (i.bytes[0] == 0xc4 || i.bytes[0] == 0xc5 || i.bytes[0] == 0x62);
}

// A legacy-SSE write that keeps part of the old vector register: scalar ss/sd operations
// (movss/movsd from memory excepted: they zero the rest), movlp/movhp, pinsr, insertps.
bool partial_vector_write(const cs_insn& i) {
  if (vex_encoded(i)) return false;  // VEX/EVEX writes zero the register above what they write
  std::string m = i.mnemonic;
  auto ends = [&](const char* s) { return m.size() > 2 && m.ends_with(s); };
  bool scalar = ends("ss") || ends("sd");
  if ((m == "movss" || m == "movsd") && i.detail->x86.op_count == 2 && i.detail->x86.operands[1].type == X86_OP_MEM)
    return false;
  return scalar || m.starts_with("movlp") || m.starts_with("movhp") || m.starts_with("pinsr") || m == "insertps" ||
         m.starts_with("cvtsi2");
}

Step effect_of(const Decoder& d, const cs_insn& i) {
  Step s;
  s.address = i.address;
  s.size = i.size;
  s.text = text(i);
  cs_regs reads, writes;
  uint8_t nr = 0, nw = 0;
  if (cs_regs_access(d.handle(), &i, reads, &nr, writes, &nw) != CS_ERR_OK) {
    s.flow = Flow::unknown;  // no register information: assume it reads everything
    return s;
  }
  for (int k = 0; k < nr; ++k) s.reads |= reg_bits(reads[k]);
  for (int k = 0; k < nw; ++k) {
    uint64_t b = reg_bits(writes[k]);
    if (!b) continue;
    bool full = (b & kVector) ? !partial_vector_write(i) : full_gpr_write(writes[k]);
    if (full) s.kills |= b;
  }
  if (zeroing_idiom(i)) s.reads &= ~s.kills;
  if (i.id == X86_INS_SYSCALL) {  // the kernel's calling convention, which Capstone does not list
    s.reads |= kRax | kRdi | kRsi | kRdx | kR10 | kR8 | kR9;
    s.kills |= kRax | kRcx | kR11;
  }
  switch (i.id) {
    case X86_INS_RET: case X86_INS_RETF: case X86_INS_RETFQ: s.flow = Flow::ret; return s;
    case X86_INS_UD2: case X86_INS_HLT: case X86_INS_INT3: s.flow = Flow::stop; return s;
    case X86_INS_CALL:
      s.flow = Flow::call;
      s.target = direct_target(i);
      return s;
    default: break;
  }
  if (cs_insn_group(d.handle(), &i, CS_GRP_JUMP)) {
    s.target = direct_target(i);
    s.flow = i.id == X86_INS_JMP ? Flow::jump : Flow::cond_jump;
    const cs_x86& x = i.detail->x86;
    if (!s.target && i.id == X86_INS_JMP && x.op_count == 1 && x.operands[0].type == X86_OP_MEM &&
        x.operands[0].mem.index == X86_REG_INVALID)
      s.got_jump = true;
    if (!s.target && !s.got_jump) s.flow = Flow::unknown;  // a switch's jump table, or jmp reg
  }
  return s;
}

// ---- the forward walk ----
class Walk {
 public:
  explicit Walk(const LivenessEnv& env) : env_(env) {}

  Liveness run(uint64_t from, uint64_t regs) {
    push(from, regs);
    while (!work_.empty() && out_.unknown.empty()) {
      auto [at, state] = work_.back();
      work_.pop_back();
      follow(at, state);
    }
    if (!out_.unknown.empty()) out_.live |= regs;
    return out_;
  }

 private:
  void push(uint64_t at, uint64_t state) { work_.push_back({at, state}); }

  void give_up(uint64_t at, std::string why) {
    out_.unknown = std::move(why);
    out_.where = at;
  }

  void read(const Step& s, uint64_t bits) {
    if (bits && !out_.live) out_.where = s.address;
    out_.live |= bits;
  }

  const Step* step_at(uint64_t at) {
    if (auto it = steps_.find(at); it != steps_.end()) return &it->second;
    if (++decoded_ > env_.max_instructions) return nullptr;
    const CodeAt* code = code_at(at);
    if (!code) return nullptr;
    const cs_insn* i = decoder_.ok() ? decoder_.decode(code->bytes, code->address, at - code->address) : nullptr;
    if (!i) return nullptr;
    return &steps_.emplace(at, effect_of(decoder_, *i)).first->second;
  }

  const CodeAt* code_at(uint64_t at) {
    for (auto& c : code_)
      if (at >= c.address && at < c.address + c.bytes.size()) return &c;
    auto c = env_.code_at(at);
    if (!c || at < c->address || at >= c->address + c->bytes.size()) return nullptr;
    code_.push_back(std::move(*c));
    return &code_.back();
  }

  void follow(uint64_t at, uint64_t state) {
    while (true) {
      uint64_t& seen = seen_[at];
      state &= ~seen;  // bits followed from here already need no second look
      if (!state) return;
      seen |= state;
      const Step* s = step_at(at);
      if (!s) {
        give_up(at, decoded_ > env_.max_instructions ? "more code than the check follows"
                                                      : "code that does not decode or has no symbol");
        return;
      }
      if (s->flow == Flow::unknown) {
        give_up(at, fmt::format("`{}` (an indirect jump hotfix cannot follow)", s->text));
        return;
      }
      read(*s, s->reads & state);
      state &= ~s->kills;
      uint64_t next = at + s->size;
      switch (s->flow) {
        case Flow::ret: out_.at_return |= state; return;
        case Flow::stop: return;
        case Flow::call: {
          std::optional<CallEffect> e = s->target ? env_.call(*s->target, state) : std::nullopt;
          CallEffect unknown{kArgs & state, kAllBits};  // the ABI: arguments in, everything clobbered
          const CallEffect& eff = e ? *e : unknown;
          read(*s, eff.reads & state);
          state &= ~eff.kills;
          at = next;
          break;
        }
        case Flow::jump:
          if (s->got_jump) {  // tail call through a pointer: arguments in, the ABI at its return
            read(*s, kArgs & state);
            return;
          }
          at = *s->target;
          break;
        case Flow::cond_jump:
          push(*s->target, state);
          at = next;
          break;
        default: at = next; break;
      }
    }
  }

  const LivenessEnv& env_;
  Decoder decoder_;
  std::vector<CodeAt> code_;
  std::unordered_map<uint64_t, Step> steps_;
  std::unordered_map<uint64_t, uint64_t> seen_;
  std::vector<std::pair<uint64_t, uint64_t>> work_;
  size_t decoded_ = 0;
  Liveness out_;
};

}  // namespace

std::vector<BranchCandidate> branch_candidates(std::span<const uint8_t> code, uint64_t address,
                                               const std::function<bool(uint64_t)>& is_target) {
  std::vector<BranchCandidate> out;
  const size_t n = code.size();
  auto consider = [&](size_t site, size_t len, int64_t rel) {
    uint64_t to = address + site + len + static_cast<uint64_t>(rel);
    if (is_target(to)) out.push_back({address + site, to});
  };
  for (size_t i = 0; i + 2 <= n; ++i) {
    uint8_t b = code[i];
    if ((b == 0xe8 || b == 0xe9) && i + 5 <= n) consider(i, 5, rel32_at(code, i + 1));  // call/jmp rel32
    if (b == 0x0f && (code[i + 1] & 0xf0) == 0x80 && i + 6 <= n) consider(i, 6, rel32_at(code, i + 2));  // jcc rel32
    if (b == 0xeb || (b & 0xf0) == 0x70) consider(i, 2, static_cast<int8_t>(code[i + 1]));  // jmp/jcc rel8
  }
  return out;
}

FunctionBranches direct_branches(std::span<const uint8_t> code, uint64_t address) {
  FunctionBranches out;
  Decoder d;
  size_t off = 0;
  while (d.ok() && off < code.size()) {
    const cs_insn* i = d.decode(code, address, off);
    if (!i) break;
    bool call = i->id == X86_INS_CALL;
    if (call || cs_insn_group(d.handle(), i, CS_GRP_JUMP))
      if (auto to = direct_target(*i)) out.branches.push_back({i->address, i->address + i->size, *to, call});
    off += i->size;
  }
  out.decoded_end = address + off;
  return out;
}

Liveness live_registers(uint64_t from, uint64_t regs, const LivenessEnv& env) {
  if (!regs) return {};
  return Walk(env).run(from, regs);
}

std::optional<uint64_t> stub_slot(std::span<const uint8_t> code, uint64_t address) {
  Decoder d;
  size_t off = 0;
  for (int n = 0; n < 3 && d.ok() && off < code.size(); ++n) {  // endbr64; bnd jmp [rip+x]
    const cs_insn* i = d.decode(code, address, off);
    if (!i) return std::nullopt;
    if (i->id == X86_INS_ENDBR64) {
      off += i->size;
      continue;
    }
    const cs_x86& x = i->detail->x86;
    if (i->id != X86_INS_JMP || x.op_count != 1 || x.operands[0].type != X86_OP_MEM ||
        x.operands[0].mem.base != X86_REG_RIP || x.operands[0].mem.index != X86_REG_INVALID)
      return std::nullopt;
    return i->address + i->size + static_cast<uint64_t>(x.operands[0].mem.disp);
  }
  return std::nullopt;
}

}  // namespace hotfix::arch
