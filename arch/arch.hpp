// The one interface between hotfix and an instruction set. Everything that knows an
// opcode, a register name or a calling convention lives below arch/<arch>/; an aarch64
// backend implements this same header.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix::arch {

const char* name();  // "x86_64"

// ---- registers of a stopped thread (PTRACE_GETREGS layout on x86_64) ----
struct Regs;  // defined per arch (arch/x86_64/regs.hpp); opaque here
struct RegsBuffer {
  alignas(16) unsigned char bytes[512];
  Regs& get() { return *reinterpret_cast<Regs*>(bytes); }
  const Regs& get() const { return *reinterpret_cast<const Regs*>(bytes); }
};
Result<void> regs__read(pid_t tid, RegsBuffer& out);          // PTRACE_GETREGS (or GETREGSET)
Result<void> regs__write(pid_t tid, const RegsBuffer& in);    // PTRACE_SETREGS
uint64_t regs__pc(const RegsBuffer& r);
uint64_t regs__sp(const RegsBuffer& r);
void regs__set_pc(RegsBuffer& r, uint64_t pc);

// Was the thread stopped inside an interrupted system call that the kernel would restart?
bool regs__in_restartable_syscall(const RegsBuffer& r);

// ---- remote system calls and function calls (register conventions) ----
// Set up `r` to execute system call `nr` with `args` at `gadget` (the address of a
// syscall instruction in the target). Also disarms syscall restart for the injected regs.
void regs__prepare_syscall(RegsBuffer& r, uint64_t gadget, long nr, std::span<const uint64_t> args);
long regs__syscall_result(const RegsBuffer& r);  // negative errno on failure

// Set up `r` to call `fn(args...)` and return to `return_trap` (an address holding a trap
// instruction). Keeps the red zone intact and the stack ABI-aligned. Returns the new stack
// pointer and the bytes the caller must write at it (the return address).
struct CallFrame {
  uint64_t sp = 0;
  std::vector<uint8_t> stack_bytes;
};
CallFrame regs__prepare_call(RegsBuffer& r, uint64_t fn, std::span<const uint64_t> args, uint64_t return_trap);
uint64_t regs__return_value(const RegsBuffer& r);

std::span<const uint8_t> syscall_instruction();  // x86_64: 0f 05
std::span<const uint8_t> trap_instruction();     // x86_64: cc
// The PC reported after a trap instruction at `trap_addr` executed.
uint64_t pc_after_trap(uint64_t trap_addr);

// ---- jumps written over a function entry ----
size_t entry_jump_size();                                // x86_64: 5 (jmp rel32)
size_t island_jump_size();                               // x86_64: 14 (jmp [rip+0]; .quad to)
int64_t near_jump_reach();                               // x86_64: ±2 GiB
std::optional<std::vector<uint8_t>> encode_entry_jump(uint64_t from, uint64_t to);  // nullopt if out of reach
std::vector<uint8_t> encode_island_jump(uint64_t island, uint64_t to);

// ---- prologue analysis (Capstone) ----
struct EntryCheck {
  bool patchable = false;
  std::string reason;      // why not, one line
  std::string disasm;      // the instructions the jump covers, "push rbp; mov rbp, rsp"
  size_t covered = 0;      // bytes of whole instructions covered by the jump
};
// `code` is the whole function (its bytes at `address`). Refuses a function shorter than the
// jump, and one with a branch into the overwritten bytes other than to the entry itself.
EntryCheck check_entry(std::span<const uint8_t> code, uint64_t address);

// Disassemble `code` at `address` into one line per instruction (for plans and diagnostics).
std::string disassemble(std::span<const uint8_t> code, uint64_t address, size_t max_insns = 8);

// ---- unwinding support ----
// DWARF register numbers and values for libdw's initial frame (dwfl_thread_state_registers).
// Returns the registers in DWARF order starting at DWARF register 0.
std::vector<uint64_t> regs__dwarf(const RegsBuffer& r);
uint64_t regs__dwarf_pc_register();  // unused by libdw when set with dwfl_thread_state_register_pc

}  // namespace hotfix::arch
