// The overhead budget of observation: what watching costs the target, estimated from each
// function's hit rate times the measured cost of one hit of its probes, and what to do when
// that is above the budget (issue 11 §2).
//
// Pieces, each usable alone:
//   probe_cost__measured()  what one hit of an entry (and of a return) uprobe costs on this
//                           machine, measured once per boot on a function of this program;
//   budget__decide()        per function: keep, drop its return probe, move it to trampoline
//                           counting, or drop it, hottest first, until the estimate fits;
//   budget__line()          the one line that says what was done.
// watch (cli/watch.cpp) and patch's observe window (observe/liveness.cpp) apply the decision
// with Watch::reduce().
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

// The default budget: 2% of one CPU, spent by the target's threads in probe traps.
constexpr double kDefaultMaxOverheadPct = 2.0;

// What one hit costs the thread that makes it, in nanoseconds of its CPU time.
struct ProbeCost {
  double entry_ns = 0;       // an entry uprobe (trap, handler, the counting BPF program)
  double return_ns = 0;      // a return probe on top of the entry probe (its trampoline trap)
  double trampoline_ns = 0;  // a counting trampoline's hit; 0: this build has none
  bool cached = false;       // read from this boot's earlier measurement
};

// What a counted call costs with a counting trampoline (one `lock add`, two jumps): measured in
// tools/bench (bench_watch, docs/performance.md) rather than here, since hotfix-ctl cannot put a
// trampoline on itself. The budget uses it for functions it moves to trampolines.
constexpr double kTrampolineHitNs = 5.0;

// The machine's probe costs: measured once per boot (a few thousand calls of a function of this
// program with an entry, then an entry and return uprobe, ~50 ms) and kept in
// /run/hotfix/probe-cost; later calls read that. HOTFIX_PROBE_COST_NS="ENTRY,RETURN" sets them
// (for tests and for machines where measuring is not wanted).
Result<ProbeCost> probe_cost__measured();
// Measure now, without the cache (tools/bench shows it beside the per-call costs).
Result<ProbeCost> probe_cost__calibrate();

// What a function's probes do now, and what the budget may make of them.
enum class ProbeState {
  entry_and_return,  // counts, in-flight and latency
  entry,             // counts only
  trampoline,        // counts by a counting trampoline (no trap)
  none,              // not observed
};

enum class BudgetAction {
  keep,
  drop_return,         // keep counting with the entry probe; in-flight and latency stop
  move_to_trampoline,  // count with a trampoline instead of the uprobe (only if ProbeCost has one)
  drop,                // detach its probes: the function is no longer observed
};
const char* budget_action__name(BudgetAction a);

struct FunctionLoad {
  std::string name;
  double calls_per_s = 0;
  ProbeState state = ProbeState::entry;
};

struct BudgetDecision {
  std::vector<BudgetAction> actions;  // by FunctionLoad index
  double before_pct = 0;              // estimated overhead, % of one CPU, before the actions
  double after_pct = 0;               // and after them
  bool changed() const;
};

// Estimated cost of one function's probes, in % of one CPU.
double budget__cost_pct(const FunctionLoad& f, const ProbeCost& cost);
double budget__total_pct(const std::vector<FunctionLoad>& functions, const ProbeCost& cost);

// Within `max_pct` of one CPU: the hottest function's probes are cut back one step at a time
// (return probe first, keeping the count; then trampoline counting if there is one; then
// drop) until the estimate fits. Cheap functions keep their probes.
BudgetDecision budget__decide(const std::vector<FunctionLoad>& functions, const ProbeCost& cost, double max_pct);

// The state a function is in after `action` (for the next decision).
ProbeState budget__after(ProbeState state, BudgetAction action);

// One line for people: "overhead budget 2% of one CPU: estimated 640% (processCommand 310%,
// lookupKey 200%, ...); dropped probes of processCommand, lookupKey; return probes of dictFind;
// now ~1.2%". Empty when nothing changed.
std::string budget__line(const std::vector<FunctionLoad>& functions, const BudgetDecision& d, const ProbeCost& cost,
                         double max_pct);


// Keeps a live Watch within the budget: call check() with counts read from it (since attach, or
// over an interval) and the seconds they cover; it decides, cuts the probes and returns the
// one line to print ("" when nothing changed).
struct CallCounts;
class Watch;
class WatchBudget {
 public:
  WatchBudget(Watch& watch, ProbeCost cost, double max_pct);

  // Trampoline counting plugs in here (issue 11 §1): given indexes into the watch's
  // functions(), start counting them with trampolines (all in one stop) and say, for each,
  // whether it could. Those that could not lose their probes all the same (dropped). The
  // budget detaches their uprobes first: a trampoline is never written where a breakpoint
  // sits, so the calls between the detach and the switch (a few ms) are not counted. While
  // unset, ProbeCost::trampoline_ns is ignored and hot functions are dropped.
  std::function<std::vector<bool>(const std::vector<size_t>&)> move_to_trampoline;

  Result<std::string> check(const std::vector<CallCounts>& counts, double seconds);
  double max_pct() const { return max_pct_; }
  const ProbeCost& cost() const { return cost_; }

 private:
  Watch& watch_;
  ProbeCost cost_;
  double max_pct_;
  std::vector<ProbeState> state_;  // by watch function index
};

}  // namespace hotfix
