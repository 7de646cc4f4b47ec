// What `hotfix-ctl watch` prints each interval: a table for people, JSON lines for programs.
#pragma once
#include <string>
#include <vector>

#include "observe/watch.hpp"

namespace hotfix {

struct WatchSample {
  double time = 0;            // unix seconds at the end of the interval
  double interval_s = 0;      // measured length of the interval (the whole run for the final one)
  bool final = false;
  bool inflight_known = true; // false without return probes
  // Per function (empty: every one as inflight_known): its return probes. Go rows show
  // "n/a (Go)" for in-flight and latency, and "inflight_na":"Go" in JSON.
  std::vector<ReturnProbes> returns;
  const std::vector<Function>* functions = nullptr;
  std::vector<CallCounts> interval;  // counts during the interval (the whole run when final)
  std::vector<CallCounts> total;     // counts since attach
  // Per function (empty: none): frames of threads that were inside before the probes came
  // and still are (observe/inside.hpp, InflightSeed), added to in-flight; and threads whose
  // stacks could not be read, shown as "+?" ("inflight_unknown" in JSON).
  std::vector<int64_t> seeded;
  std::vector<size_t> seeded_unknown;
  // The table shows at most `top` rows (0: all). When there are more functions than that,
  // functions never called are hidden first and a last line counts what is not shown.
  size_t top = 20;
};

// Mean latency is over the calls that returned in the interval (the whole run when final).
// Rows sorted by calls in the interval, then by total. Up to `top` functions, every one
// shows (a 0 is an answer); beyond that, the busiest `top` that were called show, and one
// line says how many more there are and how many of them were never called. Names are cut
// at kTableNameWidth with "…" (JSON keeps them whole and lists every function).
std::string watch__format_table(const WatchSample& s);
// One JSON object on one line (no trailing newline).
std::string watch__format_json(const WatchSample& s);

// One line naming the functions the kernel refused to probe (the first 64 of them, then how
// many more), grouped by reason: "skipped 2 functions the kernel cannot probe, watching the others;
// REASON: f (libx.so+0x1200), g (libx.so+0x1300)".
std::string watch__skipped_line(const std::vector<SkippedFunction>& skipped);

}  // namespace hotfix
