// Where a command spends its time, for whoever tunes it: with HOTFIX_TIMING=1 in the
// environment, each TimedPhase prints one line to stderr when it ends,
//   "hotfix timing: symbols 3.21 ms (cpu 3.02 ms)"
// (wall and this process's CPU time, so a loaded machine can be told from slow code).
// tools/bench/bench_patch reads these lines. Without the variable a phase costs one branch
// on a cached flag.
#pragma once

#include <cstdint>

namespace hotfix {

bool timing__enabled();

class TimedPhase {
 public:
  explicit TimedPhase(const char* name);
  ~TimedPhase() { end(); }
  TimedPhase(const TimedPhase&) = delete;
  TimedPhase& operator=(const TimedPhase&) = delete;
  // Ends the phase early (prints its line once).
  void end();

 private:
  const char* name_;
  int64_t wall_ns_ = 0, cpu_ns_ = 0;
  bool running_ = false;
};

}  // namespace hotfix
