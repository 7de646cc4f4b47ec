// The live verbs' report loop (watch, stats --interval): wait for the next tick, Ctrl-C or
// SIGTERM, or the target's exit -- all as file descriptors, so none is missed.
#pragma once
#include <sys/types.h>

#include <chrono>

#include "common/error.hpp"
#include "common/unique_fd.hpp"

namespace hotfix::cli {

struct StopSources {
  UniqueFd signals;
  UniqueFd target;  // pidfd: readable when the target exits
  // Blocks SIGINT/SIGTERM from now on: a Ctrl-C during setup is handled after it, with a report.
  static Result<StopSources> open(pid_t pid);
};

enum class Wake { tick, signal, target_exited };

Wake wait_until(StopSources& stop, std::chrono::steady_clock::time_point deadline);

}  // namespace hotfix::cli
