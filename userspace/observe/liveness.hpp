// Before a patch: which target functions are live, which threads are inside them, and the
// right moment to stop the world -- from the same uprobes as `watch`.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <optional>
#include <vector>

#include "common/error.hpp"
#include "observe/watch.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct Liveness {
  Function function;
  uint64_t calls = 0;         // during the window
  double calls_per_s = 0;
  int64_t inflight = -1;      // threads inside at the end of the window (that entered during it); -1: not measured
  bool live() const { return calls > 0 || inflight > 0; }
};

// Watch `functions` of `pid` for `window` and report each one's traffic. Return probes (for
// in-flight) are used only where no C++ exception can unwind through them.
Result<std::vector<Liveness>> liveness__observe(pid_t pid, const std::vector<Function>& functions,
                                                std::chrono::milliseconds window);

// Uprobe-driven quiescence for strict mode: rather than stopping the world blindly and
// finding a thread inside, wait until the entry/return probes say no thread is inside any
// target function, then stop. Probes are detached before the stop (their int3 must never be
// under a jump we write) and re-attached if the stop has to be retried.
class QuietWaiter {
 public:
  static Result<QuietWaiter> attach(pid_t pid, std::vector<Function> functions);
  // Wait until no watched function has a thread inside (polling the per-CPU counters, so a
  // thread leaving wakes us within ~100 us) or `deadline`. Returns whether it got quiet.
  bool wait_quiet(std::chrono::steady_clock::time_point deadline);
  void detach();
  Result<void> reattach();

 private:
  QuietWaiter(pid_t pid, std::vector<Function> functions) : pid_(pid), functions_(std::move(functions)) {}
  pid_t pid_;
  std::vector<Function> functions_;
  std::optional<Watch> watch_;
};

}  // namespace hotfix
