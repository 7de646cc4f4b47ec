// Instruction encodings hotfix writes into a target: trap, syscall, and the jumps that
// redirect a function entry.
#include <cstring>
#include <limits>

#include "arch/arch.hpp"

namespace hotfix::arch {
namespace {

constexpr uint8_t kSyscall[] = {0x0f, 0x05};
constexpr uint8_t kInt3[] = {0xcc};
constexpr uint8_t kJmpRel32 = 0xe9;
constexpr uint8_t kJmpRipIndirect[] = {0xff, 0x25, 0x00, 0x00, 0x00, 0x00};  // jmp [rip+0]

void append_le(std::vector<uint8_t>& out, uint64_t v, int bytes) {
  for (int b = 0; b < bytes; ++b) out.push_back(static_cast<uint8_t>(v >> (8 * b)));
}

}  // namespace

std::span<const uint8_t> syscall_instruction() { return kSyscall; }
std::span<const uint8_t> trap_instruction() { return kInt3; }
uint64_t pc_after_trap(uint64_t trap_addr) { return trap_addr + sizeof(kInt3); }

size_t entry_jump_size() { return 5; }
size_t island_jump_size() { return sizeof(kJmpRipIndirect) + 8; }
int64_t near_jump_reach() { return std::numeric_limits<int32_t>::max(); }

std::optional<std::vector<uint8_t>> encode_entry_jump(uint64_t from, uint64_t to) {
  // rel32 counts from the end of the jump. Both are user-space addresses (< 2^63), so the
  // signed 64-bit difference cannot overflow.
  int64_t rel = static_cast<int64_t>(to) - static_cast<int64_t>(from + entry_jump_size());
  if (rel < std::numeric_limits<int32_t>::min() || rel > std::numeric_limits<int32_t>::max())
    return std::nullopt;
  std::vector<uint8_t> out{kJmpRel32};
  append_le(out, static_cast<uint64_t>(rel), 4);
  return out;
}

std::vector<uint8_t> encode_island_jump(uint64_t /*island: absolute, so position-free*/, uint64_t to) {
  std::vector<uint8_t> out(std::begin(kJmpRipIndirect), std::end(kJmpRipIndirect));
  append_le(out, to, 8);
  return out;
}

// push rax; movabs rax, counter; lock inc qword [rax]; pop rax; jmp [rip+0]; .quad to
// The counter is addressed absolutely so that the counter page may sit anywhere. At a
// function entry the slot below the stack pointer is free (the callee owns it) and the
// flags are dead (the ABI does not preserve them across a call), so this is invisible to
// both caller and callee. `lock` keeps the count exact across threads.
std::vector<uint8_t> encode_counting_island(uint64_t island, uint64_t counter, uint64_t to) {
  std::vector<uint8_t> out{0x50, 0x48, 0xb8};  // push rax; movabs rax, imm64
  append_le(out, counter, 8);
  for (uint8_t b : {0xf0, 0x48, 0xff, 0x00, 0x58}) out.push_back(b);  // lock inc qword [rax]; pop rax
  auto jump = encode_island_jump(island + out.size(), to);
  out.insert(out.end(), jump.begin(), jump.end());
  return out;
}

size_t counting_island_size() { return 3 + 8 + 5 + island_jump_size(); }

}  // namespace hotfix::arch
