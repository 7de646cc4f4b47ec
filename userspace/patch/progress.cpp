// Progress events (see progress.hpp).
#include "patch/progress.hpp"

#include <fmt/core.h>

namespace hotfix {

std::string progress__stuck_hint(const Blocker& b) {
  return fmt::format(
      "if {} is a loop that does not return (an event loop, a worker's main loop), strict consistency can never "
      "switch it: use --consistency entry (calls already running finish in the old code), or patch the function "
      "it calls in its loop, or its caller, instead",
      b.function);
}

std::string progress_event__describe(const ProgressEvent& e) {
  using Kind = ProgressEvent::Kind;
  if (e.kind == Kind::note) return e.text;
  double left = e.left.count() / 1000.0;
  std::string others = e.blockers > 1 ? fmt::format(" (and {} more)", e.blockers - 1) : "";
  if (e.kind == Kind::stuck)
    return fmt::format("attempt {}: {}{}{} on each of the last {} attempts; still waiting, {:.1f} s left; {}",
                       e.attempt, blocker__describe(e.blocker), others, e.same_pc ? " at the same place" : "",
                       e.same_place, left,
                       progress__stuck_hint(e.blocker));
  return fmt::format("attempt {}: {}{}; retrying, {:.1f} s left", e.attempt, blocker__describe(e.blocker), others, left);
}

}  // namespace hotfix
