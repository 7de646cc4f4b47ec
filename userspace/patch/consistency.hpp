// May we switch a function now? Given the registers of every (ptrace-stopped) thread, find
// the threads that still execute -- or will return into -- a function we are about to patch.
//
// Entry mode: only the bytes the jump overwrites matter (no pc inside them).
// Strict mode (kpatch-like): no thread may have a patched function anywhere on its stack.
// Strict runs inside the stop-the-world window, so it is two-phase: a conservative scan of
// each thread's stack for words pointing into a function (return addresses must be there),
// then a libdw unwind only of the threads the scan could not clear.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "arch/arch.hpp"
#include "common/error.hpp"

namespace hotfix {

struct AddressRange {
  uint64_t begin = 0, end = 0;  // [begin, end)
  std::string name;             // for messages: "pricing::discount"
  bool contains(uint64_t a) const { return a >= begin && a < end; }
};

struct StoppedThread {
  pid_t tid = 0;
  arch::RegsBuffer regs;
  // Only the pc and stack pointer in `regs` are known: a thread read without stopping it,
  // blocked in the kernel (/proc/TID/syscall, observe/inside.hpp). The unwinder then starts
  // from those two alone, and stops where a frame's rule needs another register.
  bool pc_sp_only = false;
};

struct Blocker {
  pid_t tid = 0;
  std::string thread_name;  // empty until consistency__name_threads: /proc reads stay out of the stop window
  int frame = 0;            // 0 = the thread's pc, 1 = its caller, ...
  uint64_t pc = 0;          // the frame's pc (a return address for frame > 0)
  std::string function;     // AddressRange::name
  // The unwind stopped before reaching this word, which the scan found on the stack: it may be
  // a stale value, but we cannot prove it, so it blocks. `frame` is then a lower bound.
  bool unwind_incomplete = false;
};

// "thread 4242 (worker-3) is inside pricing::discount (frame #2, pc 0x5555...)"; reads the
// thread's name if consistency__name_threads has not.
std::string blocker__describe(const Blocker& b);

// Fill in Blocker::thread_name (/proc/TID/comm): costs a few microseconds per
// blocker, so call it after resuming the threads.
void consistency__name_threads(std::vector<Blocker>& blockers);

// Entry mode: threads whose pc lies inside the bytes being overwritten.
std::vector<Blocker> consistency__check_entry(const std::vector<StoppedThread>& threads,
                                              const std::vector<AddressRange>& overwritten);

// What the last strict check did (for benchmarks and diagnostics).
struct ConsistencyStats {
  size_t threads = 0;
  size_t stack_bytes = 0;  // read by the scan, all threads
  size_t candidates = 0;   // threads the scan could not clear
  size_t unwound = 0;      // threads unwound with libdw
  bool maps_reread = false;  // a thread new since the last read: /proc/PID/maps read again
  double maps_us = 0;      // checking (and, for a thread new since, re-reading) /proc/PID/maps
  double scan_us = 0;      // all scans
  double unwind_us = 0;    // all unwinds
  double total_us = 0;
};

// Strict mode with the expensive part (the libdw view of the process's modules: milliseconds
// for a process with libstdc++) done once, before the stop window, and reused across retries.
class ConsistencyChecker {
 public:
  // `functions` are the patched functions (whole bodies). Reads no thread state.
  static Result<ConsistencyChecker> create(pid_t pid, std::vector<AddressRange> functions);
  ConsistencyChecker(ConsistencyChecker&&) noexcept;
  ConsistencyChecker& operator=(ConsistencyChecker&&) noexcept;
  ~ConsistencyChecker();

  // Threads with any frame inside any function. Every thread must be ptrace-stopped by the
  // caller and stay stopped during the call. Fails only if the stacks cannot be read at all.
  Result<std::vector<Blocker>> check(const std::vector<StoppedThread>& threads);
  // Re-read the process's modules and mappings, e.g. after a library was loaded since create()
  // (call it before stopping the world: it costs what create() costs). check() re-reads the
  // mappings by itself when it meets a thread created since.
  Result<void> refresh();
  const ConsistencyStats& last_stats() const;

  // Every frame of each thread that is in one of the functions, not just the first: for
  // counting threads inside (observe/inside.hpp). The threads must hold still during the call
  // (ptrace-stopped, or blocked in the kernel: the caller checks they did not move).
  struct StackView {
    pid_t tid = 0;
    std::vector<uint64_t> frames;  // lookup address of every frame inside a function, innermost first
    // No frame of a function is missing from `frames` (the unwind reached the stack's end, or
    // the scan found no word on the whole stack that points into one).
    bool complete = true;
    // Otherwise: words above where the unwind stopped that point into a function (a live
    // return address or a stale value: unproven), and whether part of the stack was not read.
    std::vector<uint64_t> unproven;  // as found: a return address (or one past a function), or a saved pc
    bool unread = false;
  };
  Result<std::vector<StackView>> survey(const std::vector<StoppedThread>& threads);

 private:
  struct State;
  explicit ConsistencyChecker(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

// One-shot strict check (builds and drops a ConsistencyChecker: slow; prefer the class).
Result<std::vector<Blocker>> consistency__check_strict(pid_t pid, const std::vector<StoppedThread>& threads,
                                                       const std::vector<AddressRange>& functions);

}  // namespace hotfix
