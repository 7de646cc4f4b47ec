// The preserving island (see arch.hpp): the code and its .eh_frame unwind information.
//
//   push rbp; mov rbp, rsp; sub rsp, N          ; rsp is 16-byte aligned from here on
//   mov [rbp-8*(k+1)], REG_k  ...               ; the integer registers to keep
//   movdqu [rbp-A-16*(j+1)], xmmJ  ...          ; the vector registers to keep (128 bits)
//   call [rip+target]                           ; the replacement: arguments untouched
//   mov REG_k, [rbp-8*(k+1)] ... movdqu ...     ; back as the caller left them
//   leave; ret
//   .quad target
//
// At the entry jump the caller's `call` has pushed its return address (rsp = 8 mod 16); the
// push of rbp and N (a multiple of 16) make the `call` see a 16-byte aligned stack, as the ABI
// wants. Nothing an argument lives in is written before the call: rdi, rsi, rdx, rcx, r8, r9,
// rax (al: vector registers used by a variadic call), r10 (static chain), xmm0-7 -- and no stack
// arguments are moved (the engine refuses functions that have them), so the replacement sees
// its arguments exactly as the caller passed them. rbp is callee-saved and restored by `leave`.
#include <array>

#include "arch/arch.hpp"

namespace hotfix::arch {
namespace {

constexpr int kIntRegs = 9, kVectorBase = 9, kVectorRegs = 16;
// ClobberSet bit -> x86 register number (rax rcx rdx rsi rdi r8 r9 r10 r11) and DWARF number.
constexpr std::array<uint8_t, kIntRegs> kEncoding = {0, 1, 2, 6, 7, 8, 9, 10, 11};
constexpr std::array<uint8_t, kIntRegs> kDwarf = {0, 2, 1, 4, 5, 8, 9, 10, 11};
constexpr uint8_t kDwarfRbp = 6, kDwarfRsp = 7, kDwarfReturnAddress = 16;

void append_le(std::vector<uint8_t>& out, uint64_t v, int bytes) {
  for (int b = 0; b < bytes; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}
void put_le32(std::vector<uint8_t>& out, size_t at, uint32_t v) {
  for (int b = 0; b < 4; ++b) out[at + b] = static_cast<uint8_t>(v >> (8 * b));
}
void uleb(std::vector<uint8_t>& out, uint64_t v) {
  do {
    uint8_t byte = v & 0x7f;
    v >>= 7;
    out.push_back(byte | (v ? 0x80 : 0));
  } while (v);
}

struct Layout {
  std::vector<int> ints, vectors;  // ClobberSet bits (integer), xmm numbers
  uint32_t int_area = 0, frame = 0;
  int32_t int_slot(size_t k) const { return -8 * static_cast<int32_t>(k + 1); }
  int32_t vector_slot(size_t j) const { return -static_cast<int32_t>(int_area) - 16 * static_cast<int32_t>(j + 1); }
};

Layout layout_of(uint64_t preserve) {
  Layout l;
  for (int b = 0; b < kIntRegs; ++b)
    if (preserve >> b & 1) l.ints.push_back(b);
  for (int x = 0; x < kVectorRegs; ++x)
    if (preserve >> (kVectorBase + x) & 1) l.vectors.push_back(x);
  l.int_area = (8 * static_cast<uint32_t>(l.ints.size()) + 15) & ~15u;
  l.frame = l.int_area + 16 * static_cast<uint32_t>(l.vectors.size());
  return l;
}

// mov [rbp+disp32], reg (store) or mov reg, [rbp+disp32] (load), 64-bit.
void mov_rbp(std::vector<uint8_t>& out, uint8_t reg, int32_t disp, bool store) {
  out.push_back(0x48 | (reg >= 8 ? 0x04 : 0));  // REX.W, REX.R for r8-r15
  out.push_back(store ? 0x89 : 0x8b);
  out.push_back(0x80 | (reg & 7) << 3 | 5);  // mod=10 (disp32), rm=rbp
  append_le(out, static_cast<uint32_t>(disp), 4);
}
// movdqu [rbp+disp32], xmm (store) or movdqu xmm, [rbp+disp32] (load).
void movdqu_rbp(std::vector<uint8_t>& out, int xmm, int32_t disp, bool store) {
  out.push_back(0xf3);
  if (xmm >= 8) out.push_back(0x44);  // REX.R
  out.push_back(0x0f);
  out.push_back(store ? 0x7f : 0x6f);
  out.push_back(0x80 | (xmm & 7) << 3 | 5);
  append_le(out, static_cast<uint32_t>(disp), 4);
}

void save_or_restore(std::vector<uint8_t>& out, const Layout& l, bool save) {
  for (size_t k = 0; k < l.ints.size(); ++k) mov_rbp(out, kEncoding[l.ints[k]], l.int_slot(k), save);
  for (size_t j = 0; j < l.vectors.size(); ++j) movdqu_rbp(out, l.vectors[j], l.vector_slot(j), save);
}

struct CodeMarks {
  size_t after_push = 0, after_mov = 0, after_saves = 0, after_restores = 0, after_leave = 0, end = 0;
};

void advance(std::vector<uint8_t>& cfa, size_t& at, size_t to) {
  size_t delta = to - at;
  if (delta < 64) {
    cfa.push_back(static_cast<uint8_t>(0x40 | delta));  // DW_CFA_advance_loc
  } else {
    cfa.push_back(0x03);  // DW_CFA_advance_loc2
    append_le(cfa, delta, 2);
  }
  at = to;
}

// The CFA program of the island: CFA = rsp+8 at entry, rsp+16 after the push, rbp+16 after
// the mov; rbp and the saved integer registers in their slots while the replacement runs.
std::vector<uint8_t> frame_program(const Layout& l, const CodeMarks& m) {
  std::vector<uint8_t> p;
  size_t at = 0;
  advance(p, at, m.after_push);
  p.insert(p.end(), {0x0e, 16, static_cast<uint8_t>(0x80 | kDwarfRbp), 2});  // def_cfa_offset 16; rbp at CFA-16
  advance(p, at, m.after_mov);
  p.insert(p.end(), {0x0d, kDwarfRbp});  // def_cfa_register rbp
  advance(p, at, m.after_saves);
  for (size_t k = 0; k < l.ints.size(); ++k) {  // slot rbp-8(k+1) = CFA-8(k+3)
    p.push_back(static_cast<uint8_t>(0x80 | kDwarf[l.ints[k]]));
    uleb(p, k + 3);
  }
  advance(p, at, m.after_restores);
  for (int bit : l.ints) p.push_back(static_cast<uint8_t>(0xc0 | kDwarf[bit]));  // DW_CFA_restore
  advance(p, at, m.after_leave);
  p.insert(p.end(), {0x0c, kDwarfRsp, 8, static_cast<uint8_t>(0xc0 | kDwarfRbp)});  // def_cfa rsp+8; restore rbp
  return p;
}

void pad8(std::vector<uint8_t>& out, size_t entry_start) {
  while ((out.size() - entry_start) % 8) out.push_back(0);  // DW_CFA_nop
}

// A CIE (version 1, no augmentation: pointers are absolute 8-byte values), one FDE covering
// [begin, begin+size), and the zero terminator __register_frame stops at.
std::vector<uint8_t> eh_frame(uint64_t begin, uint64_t size, const std::vector<uint8_t>& program) {
  std::vector<uint8_t> out;
  size_t cie = out.size();
  append_le(out, 0, 4);  // length, filled in below
  append_le(out, 0, 4);  // CIE id
  out.insert(out.end(), {1, 0, 1, 0x78, kDwarfReturnAddress});  // version, "", code 1, data -8, ra
  out.insert(out.end(), {0x0c, kDwarfRsp, 8, static_cast<uint8_t>(0x80 | kDwarfReturnAddress), 1});
  pad8(out, cie + 4);
  put_le32(out, cie, static_cast<uint32_t>(out.size() - cie - 4));
  size_t fde = out.size();
  append_le(out, 0, 4);
  append_le(out, static_cast<uint32_t>(out.size() - cie), 4);  // CIE pointer: back to the CIE
  append_le(out, begin, 8);
  append_le(out, size, 8);
  out.insert(out.end(), program.begin(), program.end());
  pad8(out, fde + 4);
  put_le32(out, fde, static_cast<uint32_t>(out.size() - fde - 4));
  append_le(out, 0, 4);  // terminator
  return out;
}

}  // namespace

PreservingIsland encode_preserving_island(uint64_t island, uint64_t preserve, uint64_t to) {
  Layout l = layout_of(preserve & preservable_registers());
  CodeMarks m;
  std::vector<uint8_t> code{0x55};  // push rbp
  m.after_push = code.size();
  code.insert(code.end(), {0x48, 0x89, 0xe5});  // mov rbp, rsp
  m.after_mov = code.size();
  if (l.frame) {
    code.insert(code.end(), {0x48, 0x81, 0xec});  // sub rsp, imm32
    append_le(code, l.frame, 4);
  }
  save_or_restore(code, l, true);
  m.after_saves = code.size();
  size_t call_at = code.size();
  code.insert(code.end(), {0xff, 0x15, 0, 0, 0, 0});  // call [rip+disp32], patched below
  save_or_restore(code, l, false);
  m.after_restores = code.size();
  code.push_back(0xc9);  // leave
  m.after_leave = code.size();
  code.push_back(0xc3);  // ret
  m.end = code.size();
  while (code.size() % 8) code.push_back(0xcc);  // never executed
  put_le32(code, call_at + 2, static_cast<uint32_t>(code.size() - (call_at + 6)));
  append_le(code, to, 8);

  PreservingIsland out;
  out.code_size = m.end;
  out.unwind_offset = code.size();
  auto unwind = eh_frame(island, m.end, frame_program(l, m));
  out.bytes = std::move(code);
  out.bytes.insert(out.bytes.end(), unwind.begin(), unwind.end());
  return out;
}

size_t preserving_island_size(uint64_t preserve) { return encode_preserving_island(0, preserve, 0).bytes.size(); }

uint64_t preservable_registers() { return (1ull << (kVectorBase + kVectorRegs)) - 1; }

uint64_t return_value_registers() {
  return 1ull << 0 | 1ull << 2 | 1ull << kVectorBase | 1ull << (kVectorBase + 1);  // rax rdx xmm0 xmm1
}

}  // namespace hotfix::arch
