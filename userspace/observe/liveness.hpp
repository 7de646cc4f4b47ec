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
// finding a thread inside, wait until probes say no thread is inside any target function,
// then stop at once. The probes sit on the first instruction AFTER the bytes the entry jump
// covers and on every exit (ret, tail jump) -- never under the jump -- so they can stay
// attached through the stop and the write (no detach, which waits for an RCU grace period,
// between "quiet" and the stop), and they need no return probes (safe for C++ exceptions).
class QuietWaiter {
 public:
  static Result<QuietWaiter> attach(pid_t pid, const std::vector<Function>& functions);
  // Wait until no watched function has a thread inside that entered since attach (polling
  // the per-CPU counters every ~50 us) or `deadline`. Returns whether it got quiet.
  bool wait_quiet(std::chrono::steady_clock::time_point deadline);

 private:
  QuietWaiter(Watch w, std::vector<size_t> owner, std::vector<bool> exit, size_t n)
      : watch_(std::move(w)), owner_(std::move(owner)), exit_(std::move(exit)), functions_(n) {}
  Watch watch_;
  std::vector<size_t> owner_;  // probe -> function index
  std::vector<bool> exit_;     // probe is an exit (else the body's first instruction)
  size_t functions_;
};

}  // namespace hotfix
