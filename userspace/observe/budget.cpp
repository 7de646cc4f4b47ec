#include "observe/budget.hpp"

#include <fmt/core.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <queue>
#include <sstream>

#include "common/paths.hpp"
#include "observe/watch.hpp"
#include "process/maps.hpp"

// The calibration site: an ordinary function of this program whose first instruction the
// kernel single-steps (no emulated push or nop), i.e. the costly, common case. Outside the
// namespace and unmangled, so it is easy to recognise in a probe listing.
extern "C" __attribute__((noinline, used)) uint64_t hotfix_probe_cost_target(uint64_t x) {
  asm volatile("" : "+r"(x));
  return x * 2654435761u ^ (x >> 7);
}

namespace hotfix {

namespace {

using clock_type = std::chrono::steady_clock;

// This thread's CPU time (user + system: the kernel handles a uprobe hit in the thread that
// hit it, so the trap and the BPF program are in it).
double thread_cpu_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// Mean CPU nanoseconds per call of the calibration target over at least `min_calls` calls and
// ~5 ms. CPU time, not wall time: the budget is a share of the target's CPU, and wall time
// measured on a loaded machine counts the time others ran (a calibration at load 20 read 35 µs
// per hit where the quiet machine's hit costs 4 µs, and it was kept for the whole boot).
double ns_per_call(uint64_t min_calls) {
  volatile uint64_t sink = 0;
  uint64_t calls = 0;
  auto deadline = clock_type::now() + std::chrono::milliseconds(5);
  double cpu0 = thread_cpu_ns();
  do {
    for (int i = 0; i < 100; ++i) sink = hotfix_probe_cost_target(sink + static_cast<uint64_t>(i));
    calls += 100;
  } while (calls < min_calls || clock_type::now() < deadline);
  return (thread_cpu_ns() - cpu0) / static_cast<double>(calls);
}

Result<Function> calibration_function() {
  auto at = reinterpret_cast<uint64_t>(&hotfix_probe_cost_target);
  for (auto& m : HOTFIX_TRY(process__read_maps(::getpid())))
    if (m.contains(at) && m.file_backed()) {
      Function f;
      f.name = f.mangled = "hotfix_probe_cost_target";
      f.object = m.path;
      f.address = at;
      f.offset = at - m.start + m.offset;
      f.size = 16;
      return f;
    }
  return fail("cannot find this program's own code in /proc/self/maps");
}

// Per-call time of the target with probes on, minus without.
Result<double> probed_ns(const Function& f, bool returns, double plain_ns) {
  auto watch = HOTFIX_TRY(Watch::attach(::getpid(), {f}, WatchOptions{.returns = returns}));
  double probed = ns_per_call(200);
  return std::max(0.0, probed - plain_ns);
}

std::string boot_id() {
  std::ifstream in("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(in, id);
  return id;
}

std::string cache_path() { return std::string(kPatchDir) + "probe-cost"; }
// The cache's key: this boot, and the way it was measured ("cpu": thread CPU time), so a value
// an older hotfix-ctl measured in wall time is measured again.
std::string cache_key() { return "cpu:" + boot_id(); }

std::optional<ProbeCost> from_environment() {
  const char* v = std::getenv("HOTFIX_PROBE_COST_NS");
  if (!v || !*v) return std::nullopt;
  ProbeCost c;
  if (std::sscanf(v, "%lf,%lf", &c.entry_ns, &c.return_ns) < 1) return std::nullopt;
  c.cached = true;
  return c;
}

std::optional<ProbeCost> from_cache() {
  std::ifstream in(cache_path());
  std::string id;
  ProbeCost c;
  if (!(in >> id >> c.entry_ns >> c.return_ns) || id != cache_key() || !(c.entry_ns > 0)) return std::nullopt;
  c.cached = true;
  return c;
}

void to_cache(const ProbeCost& c) {
  ::mkdir(kPatchDir, 0755);
  std::string tmp = cache_path() + fmt::format(".{}", ::getpid());
  {
    std::ofstream out(tmp);
    out << cache_key() << ' ' << c.entry_ns << ' ' << c.return_ns << '\n';
    if (!out) return;
  }
  ::rename(tmp.c_str(), cache_path().c_str());  // several callers at once: one whole file wins
}

}  // namespace

Result<ProbeCost> probe_cost__calibrate() {
  auto f = HOTFIX_TRY(calibration_function());
  double plain = ns_per_call(200);
  ProbeCost c;
  c.entry_ns = HOTFIX_TRY(probed_ns(f, false, plain));
  c.return_ns = std::max(0.0, HOTFIX_TRY(probed_ns(f, true, plain)) - c.entry_ns);
  // A hit costs at least the trap: a measurement disturbed to zero would turn the budget off.
  c.entry_ns = std::max(c.entry_ns, 100.0);
  c.return_ns = std::max(c.return_ns, 100.0);
  return c;
}

Result<ProbeCost> probe_cost__measured() {
  if (auto env = from_environment()) return *env;
  if (auto cached = from_cache()) return *cached;
  auto c = HOTFIX_TRY(probe_cost__calibrate());
  to_cache(c);
  return c;
}

const char* budget_action__name(BudgetAction a) {
  switch (a) {
    case BudgetAction::keep: return "keep";
    case BudgetAction::drop_return: return "drop return probe";
    case BudgetAction::move_to_trampoline: return "move to trampoline";
    case BudgetAction::drop: return "drop";
  }
  return "?";
}

bool BudgetDecision::changed() const {
  return std::any_of(actions.begin(), actions.end(), [](BudgetAction a) { return a != BudgetAction::keep; });
}

namespace {

double per_hit_ns(ProbeState s, const ProbeCost& c) {
  switch (s) {
    case ProbeState::entry_and_return: return c.entry_ns + c.return_ns;
    case ProbeState::entry: return c.entry_ns;
    case ProbeState::trampoline: return c.trampoline_ns;
    case ProbeState::none: return 0;
  }
  return 0;
}

// One step down: what the budget does next to a function in state `s`.
BudgetAction next_cut(ProbeState s, const ProbeCost& c) {
  switch (s) {
    case ProbeState::entry_and_return: return BudgetAction::drop_return;
    case ProbeState::entry: return c.trampoline_ns > 0 ? BudgetAction::move_to_trampoline : BudgetAction::drop;
    case ProbeState::trampoline: return BudgetAction::drop;
    case ProbeState::none: return BudgetAction::keep;
  }
  return BudgetAction::keep;
}

// The action that takes a function from `from` to `to` in one go.
BudgetAction action_between(ProbeState from, ProbeState to) {
  if (from == to) return BudgetAction::keep;
  if (to == ProbeState::none) return BudgetAction::drop;
  if (to == ProbeState::trampoline) return BudgetAction::move_to_trampoline;
  return BudgetAction::drop_return;
}

}  // namespace

ProbeState budget__after(ProbeState state, BudgetAction action) {
  switch (action) {
    case BudgetAction::keep: return state;
    case BudgetAction::drop_return: return state == ProbeState::entry_and_return ? ProbeState::entry : state;
    case BudgetAction::move_to_trampoline: return ProbeState::trampoline;
    case BudgetAction::drop: return ProbeState::none;
  }
  return state;
}

double budget__cost_pct(const FunctionLoad& f, const ProbeCost& cost) {
  return f.calls_per_s * per_hit_ns(f.state, cost) / 1e9 * 100.0;
}

double budget__total_pct(const std::vector<FunctionLoad>& functions, const ProbeCost& cost) {
  double total = 0;
  for (auto& f : functions) total += budget__cost_pct(f, cost);
  return total;
}

BudgetDecision budget__decide(const std::vector<FunctionLoad>& functions, const ProbeCost& cost, double max_pct) {
  BudgetDecision d;
  d.actions.assign(functions.size(), BudgetAction::keep);
  d.before_pct = d.after_pct = budget__total_pct(functions, cost);
  std::vector<ProbeState> state;
  for (auto& f : functions) state.push_back(f.state);
  auto pct = [&](size_t i) { return functions[i].calls_per_s * per_hit_ns(state[i], cost) / 1e7; };
  // Hottest first: a max-heap on each function's current cost, cut one step, pushed back.
  auto cheaper = [&](size_t a, size_t b) { return pct(a) < pct(b); };
  std::priority_queue<size_t, std::vector<size_t>, decltype(cheaper)> hottest(cheaper);
  for (size_t i = 0; i < functions.size(); ++i)
    if (pct(i) > 0) hottest.push(i);
  while (d.after_pct > max_pct && !hottest.empty()) {
    size_t i = hottest.top();
    hottest.pop();
    double was = pct(i);
    state[i] = budget__after(state[i], next_cut(state[i], cost));
    d.after_pct -= was - pct(i);
    if (pct(i) > 0) hottest.push(i);
  }
  for (size_t i = 0; i < functions.size(); ++i) d.actions[i] = action_between(functions[i].state, state[i]);
  // Summed afresh: the running difference leaves rounding residue ("now ~7.1e-15%").
  d.after_pct = 0;
  for (size_t i = 0; i < functions.size(); ++i) d.after_pct += pct(i);
  return d;
}

namespace {

std::string name_list(const std::vector<FunctionLoad>& functions, const BudgetDecision& d, BudgetAction which,
                      const ProbeCost& cost) {
  constexpr size_t kNamed = 5;  // one line: name the costliest few, count the rest
  std::vector<size_t> hit;
  for (size_t i = 0; i < functions.size(); ++i)
    if (d.actions[i] == which) hit.push_back(i);
  std::sort(hit.begin(), hit.end(),
            [&](size_t a, size_t b) { return budget__cost_pct(functions[a], cost) > budget__cost_pct(functions[b], cost); });
  std::string out;
  for (size_t k = 0; k < std::min(hit.size(), kNamed); ++k)
    out += fmt::format("{}{} (~{:.3g}%)", k ? ", " : "", functions[hit[k]].name, budget__cost_pct(functions[hit[k]], cost));
  if (hit.size() > kNamed) out += fmt::format(" and {} more", hit.size() - kNamed);
  return out;
}

}  // namespace

std::string budget__line(const std::vector<FunctionLoad>& functions, const BudgetDecision& d, const ProbeCost& cost,
                         double max_pct) {
  if (!d.changed()) return {};
  std::string what;
  auto add = [&](BudgetAction a, const char* label) {
    auto names = name_list(functions, d, a, cost);
    if (!names.empty()) what += fmt::format("{}{} {}", what.empty() ? "" : "; ", label, names);
  };
  add(BudgetAction::drop, "dropped the probes of");
  add(BudgetAction::move_to_trampoline, "moved to trampoline counting");
  add(BudgetAction::drop_return, "dropped the return probes (still counted) of");
  return fmt::format("overhead budget {:.3g}% of one CPU (--max-overhead): probes estimated at ~{:.3g}%; {}; now ~{:.2g}%",
                     max_pct, d.before_pct, what, d.after_pct);
}

}  // namespace hotfix

namespace hotfix {

WatchBudget::WatchBudget(Watch& watch, ProbeCost cost, double max_pct) : watch_(watch), cost_(cost), max_pct_(max_pct) {
  for (size_t i = 0; i < watch.functions().size(); ++i)
    state_.push_back(watch.return_probes(i) == ReturnProbes::on ? ProbeState::entry_and_return : ProbeState::entry);
}

Result<std::string> WatchBudget::check(const std::vector<CallCounts>& counts, double seconds) {
  if (!(seconds > 0)) return std::string();
  ProbeCost cost = cost_;
  if (!move_to_trampoline) cost.trampoline_ns = 0;
  else if (!(cost.trampoline_ns > 0)) cost.trampoline_ns = kTrampolineHitNs;
  std::vector<FunctionLoad> load;
  for (size_t i = 0; i < state_.size() && i < counts.size(); ++i)
    load.push_back({watch_.functions()[i].name, static_cast<double>(counts[i].calls) / seconds, state_[i]});
  auto d = budget__decide(load, cost, max_pct_);
  if (!d.changed()) return std::string();
  std::vector<ProbeCut> cuts(load.size(), ProbeCut::keep);
  std::vector<size_t> moving;
  for (size_t i = 0; i < load.size(); ++i) {
    BudgetAction a = d.actions[i];
    if (a == BudgetAction::move_to_trampoline) moving.push_back(i);
    cuts[i] = a == BudgetAction::drop_return ? ProbeCut::drop_return
              : a == BudgetAction::keep      ? ProbeCut::keep
                                             : ProbeCut::drop;  // moved (its uprobes go first) or dropped
  }
  HOTFIX_CHECK(watch_.reduce(cuts));
  if (!moving.empty()) {
    auto moved = move_to_trampoline(moving);
    for (size_t k = 0; k < moving.size(); ++k)
      if (k >= moved.size() || !moved[k]) d.actions[moving[k]] = BudgetAction::drop;
  }
  for (size_t i = 0; i < load.size(); ++i) state_[i] = budget__after(state_[i], d.actions[i]);
  return budget__line(load, d, cost, max_pct_);
}

}  // namespace hotfix
