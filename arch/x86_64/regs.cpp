// Reading and writing a stopped thread's registers, and the register conventions of
// remote system calls and function calls (System V AMD64 ABI).
#include "arch/x86_64/regs.hpp"

#include <elf.h>
#include <sys/ptrace.h>
#include <sys/uio.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>

namespace hotfix::arch {
namespace {

// Kernel-internal errnos a syscall interrupted by a signal returns; never seen by user code
// because the kernel turns them into a restart (include/linux/errno.h).
constexpr long kErestartSys = 512;
constexpr long kErestartNoIntr = 513;
constexpr long kErestartNoHand = 514;
constexpr long kErestartRestartBlock = 516;
constexpr uint64_t kNrRestartSyscall = 219;  // __NR_restart_syscall on x86_64

constexpr uint64_t kRedZone = 128;      // bytes below rsp a leaf function may use
constexpr uint64_t kCallSlack = 256;    // extra distance from the thread's own stack data
constexpr uint64_t kStackAlign = 16;

// Largest XSAVE area a kernel exposes today is ~11 KiB (AMX); the kernel reports the size used.
constexpr size_t kXstateMax = 64 * 1024;

uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }

}  // namespace

Result<void> regs__read(pid_t tid, RegsBuffer& out) {
  if (::ptrace(PTRACE_GETREGS, tid, nullptr, &out.get().u) == -1)
    return fail(fmt::format("cannot read the registers of thread {}: {}", tid, std::strerror(errno)),
                "the thread must be ptrace-attached and stopped by us");
  return {};
}

Result<void> regs__write(pid_t tid, const RegsBuffer& in) {
  if (::ptrace(PTRACE_SETREGS, tid, nullptr, &in.get().u) == -1)
    return fail(fmt::format("cannot write the registers of thread {}: {}", tid, std::strerror(errno)),
                "the thread must be ptrace-attached and stopped by us");
  return {};
}

uint64_t regs__pc(const RegsBuffer& r) { return r.get().u.rip; }
uint64_t regs__sp(const RegsBuffer& r) { return r.get().u.rsp; }
void regs__set_pc(RegsBuffer& r, uint64_t pc) { r.get().u.rip = pc; }
void regs__set_sp(RegsBuffer& r, uint64_t sp) { r.get().u.rsp = sp; }

bool regs__in_restartable_syscall(const RegsBuffer& r) {
  const auto& u = r.get().u;
  if (static_cast<long>(u.orig_rax) < 0) return false;  // not stopped in a syscall
  switch (-static_cast<long>(u.rax)) {
    case kErestartSys:
    case kErestartNoIntr:
    case kErestartNoHand:
    case kErestartRestartBlock:
      return true;
    default:
      return false;
  }
}

void regs__restart_syscall(RegsBuffer& r) {
  if (!regs__in_restartable_syscall(r)) return;
  auto& u = r.get().u;
  // Same as the kernel's arch_do_signal_or_restart() when no handler runs.
  u.rax = -static_cast<long>(u.rax) == kErestartRestartBlock ? kNrRestartSyscall : u.orig_rax;
  u.rip -= syscall_instruction().size();
  u.orig_rax = static_cast<uint64_t>(-1);
}

Result<ExtendedRegs> regs__read_extended(pid_t tid) {
  ExtendedRegs out;
  out.bytes.resize(kXstateMax);
  iovec iov{out.bytes.data(), out.bytes.size()};
  if (::ptrace(PTRACE_GETREGSET, tid, reinterpret_cast<void*>(NT_X86_XSTATE), &iov) == -1)
    return fail(fmt::format("cannot read the FP/vector registers of thread {}: {}", tid, std::strerror(errno)),
                "the thread must be ptrace-attached and stopped by us");
  out.bytes.resize(iov.iov_len);  // the kernel wants back exactly the size it gave
  return out;
}

Result<void> regs__write_extended(pid_t tid, const ExtendedRegs& in) {
  iovec iov{const_cast<uint8_t*>(in.bytes.data()), in.bytes.size()};
  if (::ptrace(PTRACE_SETREGSET, tid, reinterpret_cast<void*>(NT_X86_XSTATE), &iov) == -1)
    return fail(fmt::format("cannot write the FP/vector registers of thread {}: {}", tid, std::strerror(errno)),
                "write back exactly what regs__read_extended returned, to a thread we stopped");
  return {};
}

size_t max_syscall_args() { return 6; }

void regs__prepare_syscall(RegsBuffer& r, uint64_t gadget, long nr, std::span<const uint64_t> args) {
  if (args.size() > max_syscall_args()) {
    // A caller bug, caught before anything touched the target (regs are only in `r`).
    std::fprintf(stderr, "hotfix: internal error: system call %ld with %zu arguments\n", nr, args.size());
    std::abort();
  }
  auto& u = r.get().u;
  unsigned long long* slots[] = {&u.rdi, &u.rsi, &u.rdx, &u.r10, &u.r8, &u.r9};
  for (size_t i = 0; i < args.size(); ++i) *slots[i] = args[i];
  u.rax = static_cast<uint64_t>(nr);
  u.rip = gadget;
  u.orig_rax = static_cast<uint64_t>(-1);  // not "in a syscall": no restart applied to these regs
}

long regs__syscall_result(const RegsBuffer& r) { return static_cast<long>(r.get().u.rax); }

CallFrame regs__prepare_call(RegsBuffer& r, uint64_t fn, std::span<const uint64_t> args, uint64_t return_trap) {
  auto& u = r.get().u;
  unsigned long long* slots[] = {&u.rdi, &u.rsi, &u.rdx, &u.rcx, &u.r8, &u.r9};
  constexpr size_t kRegArgs = std::size(slots);
  size_t in_regs = std::min(args.size(), kRegArgs);
  for (size_t i = 0; i < in_regs; ++i) *slots[i] = args[i];
  auto on_stack = args.subspan(in_regs);

  // Stack arguments start at a 16-byte boundary; the return address sits just below, so at
  // the callee's entry (rsp + 8) % 16 == 0 as the ABI requires.
  uint64_t args_base = align_down(u.rsp - kRedZone - kCallSlack - 8 * on_stack.size(), kStackAlign);
  uint64_t sp = args_base - 8;

  CallFrame frame;
  frame.sp = sp;
  auto push_le = [&](uint64_t v) {
    for (int b = 0; b < 8; ++b) frame.stack_bytes.push_back(static_cast<uint8_t>(v >> (8 * b)));
  };
  push_le(return_trap);
  for (uint64_t a : on_stack) push_le(a);

  u.rsp = sp;
  u.rip = fn;
  u.rax = 0;  // varargs: number of vector registers used
  u.orig_rax = static_cast<uint64_t>(-1);
  return frame;
}

uint64_t regs__return_value(const RegsBuffer& r) { return r.get().u.rax; }

std::vector<uint64_t> regs__dwarf(const RegsBuffer& r) {
  const auto& u = r.get().u;
  // DWARF numbering of the x86-64 psABI: 0..15 general registers, 16 = return address (rip).
  return {u.rax, u.rdx, u.rcx, u.rbx, u.rsi, u.rdi, u.rbp, u.rsp,
          u.r8,  u.r9,  u.r10, u.r11, u.r12, u.r13, u.r14, u.r15, u.rip};
}

uint64_t regs__dwarf_pc_register() { return 16; }

}  // namespace hotfix::arch
