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
  // Threads inside at the end of the window, from a look at every thread (observe/inside.hpp):
  // those that entered before the probes too. -1: not measured.
  int64_t inflight = -1;
  bool probed = true;         // false: the kernel refused to probe it (calls unknown, not zero)
  size_t inside_unknown = 0;  // threads whose stack could not be read far enough (inflight is then a lower bound)
  bool trampoline = false;    // counted by a counting trampoline (no return probes: in-flight from one look)
  bool live() const { return calls > 0 || inflight > 0; }
};

// Watch `functions` of `pid` for `window` and report each one's traffic, in their order. Return
// probes (for in-flight) are used only where no C++ exception can unwind through them, and
// never on Go code.
Result<std::vector<Liveness>> liveness__observe(pid_t pid, const std::vector<Function>& functions,
                                                std::chrono::milliseconds window);

// Threads inside each function now, from one look at every thread (observe/inside.hpp), into
// `functions` (inflight, inside_unknown). If the look fails, the probes' in-flight stays, and
// the returned line says why ("" when it worked). The observe windows call it at their end.
std::string liveness__threads_inside(pid_t pid, std::vector<Liveness>& functions);

// How patch's observe window runs: a fixed window, or adaptive -- `first` (100 ms), extended by
// steps of `first` up to `window` while some function has too few calls to judge (seen, but
// fewer than kJudgeCalls).
//
// Counting (issue 11 §1): by default every function whose prologue can move gets a watch
// counting trampoline (patch/watchstubs.hpp: the same checks, stop, registry record, journal and
// exact removal as `watch`), all in one stop, removed in one stop at the end of the window --
// before the patch writes its jumps on the same entries. A function refused one (prologue that
// cannot move, patched by hotfix, Go code, someone else's breakpoint) is counted by a uprobe,
// and a note names it. `trampolines = false` (`--count uprobe`) uses uprobes for all.
//
// The overhead budget (observe/budget.hpp) applies to the uprobes at every step: the hottest
// functions move to trampolines (uprobe mode, one batch per window) or lose their probes, and
// keep the rate measured until then.
struct ObserveWindow {
  std::chrono::milliseconds window{1000};  // fixed length, or the adaptive bound
  bool adaptive = true;
  std::chrono::milliseconds first{100};
  // With uprobes in the window, the budget takes one extra look this soon after they attach:
  // until its first look, every hit of a hot uprobed function traps (~15 us each), and the
  // budget can only cut what it has seen. The window's length does not change.
  static constexpr std::chrono::milliseconds kEarlyBudgetLook{20};
  double max_overhead_pct = 2.0;
  bool trampolines = true;
  // The stop that writes the trampolines' jumps waits this long for no thread to be inside the
  // bytes they cover; then the window counts with uprobes instead (and says so).
  std::chrono::milliseconds install_timeout{1000};
  static constexpr uint64_t kJudgeCalls = 20;
};
struct ObserveReport {
  std::vector<Liveness> functions;  // in the order asked
  double seconds = 0;               // how long it observed
  std::vector<std::string> notes;   // what it did: "extended to 0.4 s: ...", the budget's line
  size_t trampolines = 0;           // functions counted by trampolines (moved by the budget included)
  size_t uprobes = 0;               // functions counted by uprobes (at the start of the window)
};
Result<ObserveReport> liveness__observe_window(pid_t pid, const std::vector<Function>& functions,
                                               const ObserveWindow& how);

// Uprobe-driven quiescence for strict mode: rather than stopping the world blindly and
// finding a thread inside, wait until probes say no thread is inside any target function,
// then stop at once. The probes sit on the first instruction AFTER the bytes the entry jump
// covers and on every exit (ret, tail jump) -- never under the jump -- so they can stay
// attached through the stop and the write (no detach, which waits for an RCU grace period,
// between "quiet" and the stop), and they need no return probes (safe for C++ exceptions).
//
// Probes cannot see a thread that entered before they came: it would read "quiet" at once.
// So the waiter is seeded from a blocked stop, which knows exactly which threads were inside
// (the blockers): "inside" = the blockers + entries since the seed - exits since the seed.
class QuietWaiter {
 public:
  static Result<QuietWaiter> attach(pid_t pid, const std::vector<Function>& functions);

  // Where a blocked stop found a thread: its frame's pc (a return address unless innermost).
  struct Inside {
    uint64_t pc = 0;
    bool innermost = false;  // frame 0: pc is the next instruction, not a return address
  };
  // Start counting from a stop's blockers. Call it while every thread is stopped (the
  // counters are then still), or right after attach (then a blocker that left between the
  // stop and the attach keeps the count up until the next stop reseeds it). Returns whether
  // every blocker is inside a watched function; if not, the probes cannot see it leave.
  bool seed(const std::vector<Inside>& blockers);
  // Whether the last seed placed every blocker (false: wait blindly instead).
  bool sees_all() const { return sees_all_; }

  // Wait until no watched function has a thread inside (polling the per-CPU counters every
  // ~50 us; every 1 ms once no count has moved for 20 ms) or `deadline`. Returns whether it
  // got quiet.
  bool wait_quiet(std::chrono::steady_clock::time_point deadline);

 private:
  struct Tracked {
    uint64_t begin = 0, end = 0;  // the body, runtime addresses
    uint64_t counted_from = 0;    // the body probe: a thread before it has not been counted yet
  };
  QuietWaiter(Watch w, std::vector<size_t> owner, std::vector<bool> exit, std::vector<Tracked> functions)
      : watch_(std::move(w)), owner_(std::move(owner)), exit_(std::move(exit)), functions_(std::move(functions)),
        base_(functions_.size(), 0), seeded_(functions_.size(), 0) {}
  // Entries minus exits per function since attach, or nullopt if the counters cannot be read.
  std::optional<std::vector<int64_t>> net() const;
  Watch watch_;
  std::vector<size_t> owner_;  // probe -> function index
  std::vector<bool> exit_;     // probe is an exit (else the body's first instruction)
  std::vector<Tracked> functions_;  // by function index; begin == end: not tracked
  std::vector<int64_t> base_;       // net() at the seed
  std::vector<int64_t> seeded_;     // blockers inside each function at the seed
  bool sees_all_ = true;
  std::vector<int64_t> last_net_;                 // the counts at the last poll ...
  std::chrono::steady_clock::time_point last_change_{};  // ... and when they last moved
};

}  // namespace hotfix
