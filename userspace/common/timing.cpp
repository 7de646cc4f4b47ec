#include "common/timing.hpp"

#include <time.h>

#include <cstdio>
#include <cstdlib>

namespace hotfix {

namespace {

int64_t now_ns(clockid_t clock) {
  timespec ts;
  ::clock_gettime(clock, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

}  // namespace

bool timing__enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("HOTFIX_TIMING");
    return v && *v && *v != '0';
  }();
  return enabled;
}

TimedPhase::TimedPhase(const char* name) : name_(name) {
  if (!timing__enabled()) return;
  running_ = true;
  wall_ns_ = now_ns(CLOCK_MONOTONIC);
  cpu_ns_ = now_ns(CLOCK_PROCESS_CPUTIME_ID);
}

void TimedPhase::end() {
  if (!running_) return;
  running_ = false;
  double wall = static_cast<double>(now_ns(CLOCK_MONOTONIC) - wall_ns_) / 1e6;
  double cpu = static_cast<double>(now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu_ns_) / 1e6;
  std::fprintf(stderr, "hotfix timing: %s %.2f ms (cpu %.2f ms)\n", name_, wall, cpu);
}

}  // namespace hotfix
