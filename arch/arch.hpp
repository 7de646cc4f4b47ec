// The one interface between hotfix and an instruction set. Everything that knows an
// opcode, a register name or a calling convention lives below arch/<arch>/; an aarch64
// backend implements this same header.
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
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
void regs__set_sp(RegsBuffer& r, uint64_t sp);

// Was the thread stopped inside an interrupted system call that the kernel would restart?
bool regs__in_restartable_syscall(const RegsBuffer& r);
// Do by hand what the kernel does to restart the interrupted system call in `r`: put the pc
// back on the syscall instruction and reload the syscall number, and disarm the kernel's own
// restart logic. Only for a thread that resumes from a stop where the kernel would not restart
// (a syscall-exit stop). At a signal, group or event stop -- where PTRACE_SEIZE/INTERRUPT and
// the trap after a remote call leave the thread -- writing back the saved registers is enough:
// the kernel restarts the call itself. No-op unless regs__in_restartable_syscall(r).
void regs__restart_syscall(RegsBuffer& r);

// ---- FP/vector register state (x86_64: the whole XSAVE area) ----
// A remote function call (dlopen, a fix's constructor) may clobber FP/SIMD registers the
// interrupted thread was using; save them before and restore them after, with the general
// registers. The bytes are the kernel's regset layout; treat them as opaque.
struct ExtendedRegs {
  std::vector<uint8_t> bytes;
};
Result<ExtendedRegs> regs__read_extended(pid_t tid);                // PTRACE_GETREGSET
Result<void> regs__write_extended(pid_t tid, const ExtendedRegs& in);  // PTRACE_SETREGSET

// ---- remote system calls and function calls (register conventions) ----
// Set up `r` to execute system call `nr` with `args` at `gadget` (the address of a
// syscall instruction in the target). Also disarms syscall restart for the injected regs.
// At most max_syscall_args() args (more is a programming error: the process aborts).
size_t max_syscall_args();  // 6
void regs__prepare_syscall(RegsBuffer& r, uint64_t gadget, long nr, std::span<const uint64_t> args);
long regs__syscall_result(const RegsBuffer& r);  // negative errno on failure

// Set up `r` to call `fn(args...)` and return to `return_trap` (an address holding a trap
// instruction). Keeps the red zone intact and the stack ABI-aligned. Returns the new stack
// pointer and the bytes the caller must write at it (the return address, then any arguments
// that do not fit in registers -- integer/pointer arguments only). Disarms syscall restart.
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

// ---- self-restoring remote code (arch/x86_64/sigframe.cpp) ----
// Code hotfix runs in a target thread (a system call, a function call) starts on a real signal
// frame built below the thread's red zone from its saved state -- registers, FP/vector state,
// signal mask, sigaltstack -- and ends in the kernel's rt_sigreturn on that frame. So the
// thread puts itself back exactly as it was even if hotfix dies at any instruction meanwhile.
struct SelfRestoreFrame {
  uint64_t sp = 0;             // the frame's first byte (its return-address slot): the code's rsp
  std::vector<uint8_t> bytes;  // to write at sp
  uint64_t fpstate = 0;        // where the FP/vector image is
  uint64_t altstack_addr = 0;  // where the frame holds the thread's stack_t (sigaltstack)
  uint64_t result_slot = 0;    // where the call-return stub leaves the return value
  RegsBuffer resumed{};        // the registers rt_sigreturn gives the thread (a restartable syscall restarted)
};
// `altstack` is the thread's sigaltstack as stack_t bytes (sigframe__altstack_size()), which
// rt_sigreturn re-installs; `return_address` is where code run on the frame returns.
Result<SelfRestoreFrame> sigframe__build(const RegsBuffer& saved, uint64_t sigmask, const ExtendedRegs& xstate,
                                         std::span<const uint8_t> altstack, uint64_t return_address);
size_t sigframe__altstack_size();
std::vector<uint8_t> sigframe__no_altstack();   // stack_t with SS_DISABLE
long sigreturn_syscall_nr();                    // x86_64: 15
std::span<const uint8_t> sigreturn_code();      // glibc's __restore_rt: mov rax, 15; syscall
std::span<const uint8_t> syscall_return_gadget();  // syscall; ret
// Where a called function returns to: keeps its return value at result_slot, then rt_sigreturn.
std::vector<uint8_t> encode_call_return_stub();
// Registers to run syscall `nr` at `gadget` (syscall_return_gadget()) with rsp = frame.sp.
void regs__prepare_syscall_on_frame(RegsBuffer& r, uint64_t gadget, long nr, std::span<const uint64_t> args,
                                    uint64_t sp);
// Registers to call fn(args...) (at most 6 integer args) returning via the frame's return address.
Result<void> regs__prepare_call_on_frame(RegsBuffer& r, uint64_t fn, std::span<const uint64_t> args, uint64_t sp);
long regs__syscall_nr(const RegsBuffer& r);  // at a syscall stop: the call being made
// Make the system call `r` is stopped in (an interrupt stop after it was interrupted) return
// `result` (a negative errno) to user space instead of being restarted.
void regs__end_syscall(RegsBuffer& r, long result);
// Interrupted in a call the kernel restarts through its restart block (relative sleeps)?
// rt_sigreturn resets that block, so the tracer, when alive, restores such a thread by hand.
bool regs__restart_needs_block(const RegsBuffer& r);
// The registers to give a thread at a syscall-entry stop (with the syscall skipped) or a
// syscall-exit stop, where the kernel restarts nothing: regs__restart_syscall, orig = -1.
RegsBuffer regs__resume_by_hand(const RegsBuffer& saved);
// "" if `actual` equals `expected` in every register user code can see, else what differs.
std::string regs__diff(const RegsBuffer& actual, const RegsBuffer& expected);

// ---- jumps written over a function entry ----
size_t entry_jump_size();                                // x86_64: 5 (jmp rel32)
size_t island_jump_size();                               // x86_64: 14 (jmp [rip+0]; .quad to)
int64_t near_jump_reach();                               // x86_64: 2^31-1 (largest |displacement| both ways)
std::optional<std::vector<uint8_t>> encode_entry_jump(uint64_t from, uint64_t to);  // nullopt if out of reach
std::vector<uint8_t> encode_island_jump(uint64_t island, uint64_t to);
// An island that adds 1 to the 64-bit counter at `counter` (atomically, preserving every
// register the ABI says is live at a function entry) and then jumps to `to`: how patched
// functions count their new-code hits without a trap.
std::vector<uint8_t> encode_counting_island(uint64_t island, uint64_t counter, uint64_t to);
size_t counting_island_size();

// A preserving island (arch/x86_64/preserve.cpp): saves the call-clobbered registers in
// `preserve` (ClobberSet numbering), calls `to` (the replacement, or a counting island in front
// of it) as a normal call -- every argument register, the stack arguments' absence checked by
// the caller of this function, 16-byte alignment at the call -- restores them and returns to
// the original caller. The return-value registers are restored only when in `preserve` (the
// caller decides: a function returning a value there cannot have them in the set). Its unwind
// information (a CIE and one FDE in .eh_frame format, zero-terminated, absolute addresses) sits
// at `unwind_offset` in the same bytes, ready for the target's __register_frame, so that a C++
// exception thrown in the replacement unwinds through the island into the original caller.
struct PreservingIsland {
  std::vector<uint8_t> bytes;
  size_t unwind_offset = 0;  // where the .eh_frame bytes start
  size_t code_size = 0;      // bytes of instructions (the FDE covers [0, code_size))
};
PreservingIsland encode_preserving_island(uint64_t island, uint64_t preserve, uint64_t to);
size_t preserving_island_size(uint64_t preserve);
// The registers a preserving island saves as their call-clobbered bits (every one of them:
// integer and vector, xmm as 128 bits), and the return-value registers among them (rax, rdx,
// xmm0, xmm1).
uint64_t preservable_registers();
uint64_t return_value_registers();

// ---- uprobes (arch/x86_64/uprobe_hint.cpp) ----
// Whether the kernel will likely refuse a uprobe on the instruction at code[0] (x86_64: a
// `lock` or ES/CS/SS/DS segment prefix, a VEX/EVEX-encoded instruction, a breakpoint -- what
// arch/x86/kernel/uprobes.c cannot single-step or emulate). A hint only, to ask the kernel
// about such offsets one by one: the kernel's own answer to the attach decides.
bool uprobe_likely_refused(std::span<const uint8_t> code);

// ---- prologue analysis (Capstone) ----
struct EntryCheck {
  bool patchable = false;
  std::string reason;      // why not, one line
  std::string disasm;      // the instructions the jump covers, "push rbp; mov rbp, rsp"
  size_t covered = 0;      // bytes of whole instructions covered by the jump
  // Informational, does not block a patch (we never execute the old bytes elsewhere):
  bool rip_relative = false;      // a covered instruction addresses memory relative to the pc
  bool indirect_branches = false; // the function has branches whose targets cannot be checked
  std::string note;               // one line about the above, empty if nothing to say
};
// `code` is the whole function (its bytes at `address`). Refuses a function shorter than the
// jump, undecodable or truncated instructions under the jump, and a direct branch anywhere in
// `code` into the overwritten bytes other than to the entry itself. Cannot see: indirect
// branches (jump tables) and branches from outside `code` (a compiler's .cold part: see
// check_branches_into_entry).
EntryCheck check_entry(std::span<const uint8_t> code, uint64_t address);
// The same sweep over code that belongs to the function but lies elsewhere (its `.cold`
// part, `code` at `address`): "" when no direct branch in it lands inside the `covered`
// bytes after `entry` (the entry itself is fine), else why not, one line.
std::string check_branches_into_entry(std::span<const uint8_t> code, uint64_t address, uint64_t entry,
                                      size_t covered);
// Does `code` (at `address`) hold a direct call or jump to `target`? (Who calls a clone.)
bool branches_to(std::span<const uint8_t> code, uint64_t address, uint64_t target);

// ---- calling-convention check (GCC's -fipa-ra; arch/<arch>/clobbers.cpp, liveness.cpp) ----
// At -O2 GCC lets a caller keep values in call-clobbered registers across a call when it can
// see that the callee (same translation unit, binds locally) never writes them. Only direct
// calls in the same object can rely on that; calls through the PLT/GOT or a pointer rely on
// the ABI alone. A replacement that writes more of them than the original is checked at every
// direct call site: is any of those registers live after the return? The engine finds the
// code and follows calls (with caches); these primitives decode it.
//
// Register sets are bit masks in an arch-defined numbering of the call-clobbered registers.
struct ClobberSet {
  uint64_t bits = 0;
  bool all = false;  // calls code nobody can see: may change every call-clobbered register
};
uint64_t call_clobbered_registers();  // every bit
uint64_t argument_registers();        // where a call may pass arguments (x86_64: rdi..r9, xmm0..7)
std::string register_names(uint64_t bits);  // "rcx, r8, xmm3"
// The registers for which GCC's -fcall-saved-REG really makes a function save and restore
// them (verified with GCC 12: not the return registers, not the vector registers), and the
// flags. They work only for a function that calls nothing: GCC then also assumes every callee
// preserves REG, which code built without the flag does not.
uint64_t saved_by_gcc_flag();
std::string register_flags(uint64_t bits);  // "-fcall-saved-rcx -fcall-saved-r8"

// What one function's own code does to them (`code` is the whole function at `address`).
struct ClobberScan {
  uint64_t written = 0;          // registers its instructions write
  uint64_t preserved = 0;        // pushed and popped back (-fcall-saved-REG): unchanged whatever it calls
  std::vector<uint64_t> calls;   // targets of direct calls and of direct jumps out of `code`
  bool indirect_calls = false;   // calls through a register or memory
  bool indirect_jumps = false;   // jumps through a register or memory (a switch, or a tail call)
  bool undecodable = false;      // bytes that do not decode: the rest is unseen
};
ClobberScan scan_clobbers(std::span<const uint8_t> code, uint64_t address);

// The code of the function containing an address (its whole bytes at `address`).
struct CodeAt {
  std::vector<uint8_t> bytes;
  uint64_t address = 0;
};

// Direct references by bytes alone (the fast pre-filter over a whole text segment): every place
// where a direct call or jump encoding would transfer to an address `is_target` accepts.
// Candidates only: confirm them with direct_branches from the containing function's start.
struct BranchCandidate {
  uint64_t site = 0, target = 0;
};
std::vector<BranchCandidate> branch_candidates(std::span<const uint8_t> code, uint64_t address,
                                               const std::function<bool(uint64_t)>& is_target);
// Every direct call, jump and conditional jump of a function, decoded from its start.
struct DirectBranch {
  uint64_t site = 0;    // the instruction
  uint64_t next = 0;    // the one after it: where a call returns
  uint64_t target = 0;
  bool call = false;    // false: a (conditional) jump -- a tail call when it leaves the function
};
struct FunctionBranches {
  std::vector<DirectBranch> branches;
  uint64_t decoded_end = 0;  // where decoding stopped: the function's end unless bytes did not decode
};
FunctionBranches direct_branches(std::span<const uint8_t> code, uint64_t address);

// Liveness after a call returns. A direct call the walk meets reads and kills what `call`
// says; an unknown one (indirect, or `call` gives nullopt) reads the argument registers and
// kills every call-clobbered one, as the ABI says. Jumps are followed into other functions
// (tail calls, .cold parts) through `code_at`.
struct CallEffect {
  uint64_t reads = 0;  // of the registers asked about, those the callee may read before writing
  uint64_t kills = 0;  // what the caller's compiler assumed the callee changes
};
struct LivenessEnv {
  std::function<std::optional<CodeAt>(uint64_t address)> code_at;  // nullopt: no known code there
  std::function<std::optional<CallEffect>(uint64_t entry, uint64_t regs)> call;
  size_t max_instructions = 20000;
};
struct Liveness {
  uint64_t live = 0;       // read before written on some path (all of `regs` when `unknown`)
  uint64_t at_return = 0;  // reach a return unwritten: the answer is the callers' (to the engine)
  uint64_t where = 0;      // the first instruction that reads one, or where the walk gave up
  std::string unknown;     // non-empty: a path could not be followed (an indirect jump, data)
};
Liveness live_registers(uint64_t from, uint64_t regs, const LivenessEnv& env);

// A PLT-style stub at `address` (`jmp [rip+x]`, after an endbr64): the slot it jumps through.
std::optional<uint64_t> stub_slot(std::span<const uint8_t> code, uint64_t address);

// Disassemble `code` at `address` into one line per instruction (for plans and diagnostics).
std::string disassemble(std::span<const uint8_t> code, uint64_t address, size_t max_insns = 8);

// ---- moving instructions and counting trampolines (arch/x86_64/relocator.cpp) ----
// After frida-gum's GumX86Relocator. The whole instructions at the start of `code` (its bytes
// at `from`) that cover at least `min_bytes`, re-encoded to run at `to` with the same effect:
// pc-relative memory operands keep the byte they address, relative jumps and calls keep their
// target (rel8 widened to rel32; beyond rel32's reach an absolute sequence). Refused, saying
// why: bytes that do not decode or run past `code`, a branch into the moved bytes other than to
// their first byte, an instruction with no re-encodable form (loop, jrcxz, xbegin), and a
// pc-relative operand whose target is beyond a 32-bit displacement from `to`.
struct Relocation {
  std::vector<uint8_t> code;  // what runs at `to`
  size_t consumed = 0;        // source bytes moved: whole instructions, >= min_bytes
  std::string disasm;         // the moved instructions, "push rbp; lea rax, [rip + 0x2e5c]"
};
Result<Relocation> relocate(std::span<const uint8_t> code, uint64_t from, uint64_t to, size_t min_bytes);
size_t relocated_max_size(size_t min_bytes);  // bound on Relocation::code for min_bytes of input

// A counting trampoline at `at` for the function at `fn` (`code`: its whole body): adds 1 to the
// 64-bit counter at `counter` (atomically, preserving every register live at an entry), runs the
// instructions an entry jump at `fn` covers, relocated, and jumps back to the first byte after
// them. With the entry jump fn -> at every call of `fn` counts, whoever makes it and however
// (direct, PLT, pointer). Refuses what check_entry refuses in `code` (a branch from the body into
// the covered bytes) and what relocate refuses.
struct CountingTrampoline {
  std::vector<uint8_t> code;
  size_t covered = 0;  // bytes at `fn` the entry jump overwrites (the moved instructions)
  std::string disasm;
};
Result<CountingTrampoline> encode_counting_trampoline(std::span<const uint8_t> code, uint64_t fn, uint64_t at,
                                                      uint64_t counter);
size_t counting_trampoline_max_size();

// ---- unwinding support ----
// DWARF register numbers and values for libdw's initial frame (dwfl_thread_state_registers).
// Returns the registers in DWARF order starting at DWARF register 0.
std::vector<uint64_t> regs__dwarf(const RegsBuffer& r);
uint64_t regs__dwarf_pc_register();  // unused by libdw when set with dwfl_thread_state_register_pc

// ---- stack layout (the consistency scan; arch/<arch>/stack.cpp) ----
// Does every call leave its return address in memory on the stack (x86_64: yes, `call` pushes
// it)? Where not (a link register), a stack scan cannot prove a thread clear of a function.
bool return_addresses_on_stack();
size_t stack_slot_size();         // size and alignment of a saved return address; x86_64: 8
unsigned dwarf_sp_register();     // DWARF number of the stack pointer; x86_64: 7 (rsp)
// How far the first `bytes` bytes of `code` (at `address`; whole instructions) move the stack
// pointer down: where the return address of a call into `code` sits relative to the stack
// pointer after them. nullopt when they change it in a way not modelled.
std::optional<uint64_t> stack_depth_after(std::span<const uint8_t> code, uint64_t address, size_t bytes);

// Signal frames. A handler's return address is the restorer, whose code is this sequence
// (x86_64: glibc's __restore_rt, `mov rax, 15; syscall`, i.e. rt_sigreturn). The frame the
// kernel pushed for the handler starts at the slot holding that return address; the pc and
// stack pointer of the interrupted code are saved at these byte offsets from that slot.
std::vector<uint8_t> sigreturn_sequence();
size_t sigframe_pc_offset();
size_t sigframe_sp_offset();

// ---- dynamic relocations (the binder patches a fix library's GOT / data words) ----
// What a dynamic relocation type asks the loader to store at r_offset, for the ones the
// binder knows how to redo by hand: `got` = the symbol's address S (GOT and PLT slots),
// `absolute64` = S + r_addend as 8 bytes. Anything else (TLS, PC-relative, copy) is
// `unsupported`.
enum class RelocKind { got, absolute64, unsupported };
RelocKind reloc_kind(uint32_t type);
std::string reloc_name(uint32_t type);  // "R_X86_64_GLOB_DAT", or "relocation type N"
// An IRELATIVE relocation: the loader stores at r_offset what the resolver at r_addend
// returns (the implementation of an IFUNC this process uses).
bool reloc_is_irelative(uint32_t type);

// ---- exits of a function (old-code hit counting; arch/<arch>/exits.cpp) ----
// Where a call leaves the function: a probe on each exit counts the calls that ran this code.
struct ExitPoints {
  std::vector<uint64_t> offsets;  // from the start of `code`: returns, and jumps out of it (tail calls)
  size_t unresolved = 0;          // jumps whose target is unknown or conditional tail calls: not counted
  bool decoded_all = true;        // false if bytes stopped decoding (data in text): exits after them missed
};
// `code` is the whole function (its original bytes at `address`). A jump through a register may
// be a switch or a tail call; it is left out (counted in `unresolved`), never double-counted.
ExitPoints exit_points(std::span<const uint8_t> code, uint64_t address);

}  // namespace hotfix::arch
