#include "observe/liveness.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "observe/budget.hpp"
#include "observe/inside.hpp"
#include "observe/patchcount.hpp"
#include "observe/uprobe_multi.hpp"

#include "observe/probe_safety.hpp"

namespace hotfix {

using namespace std::chrono;

Result<std::vector<Liveness>> liveness__observe(pid_t pid, const std::vector<Function>& functions,
                                                milliseconds window) {
  bool returns = probe__objects_with_exceptions(functions).empty();  // Go code: Watch never gives it any
  auto watch = HOTFIX_TRY(Watch::attach(pid, functions, WatchOptions{.returns = returns}));
  auto began = steady_clock::now();
  std::this_thread::sleep_for(window);
  auto counts = HOTFIX_TRY(watch.read());
  double seconds = duration<double>(steady_clock::now() - began).count();
  std::vector<Liveness> out;
  for (auto& f : functions) out.push_back({f, 0, 0, -1, false});  // a function the kernel refused stays unmeasured
  for (size_t j = 0; j < counts.size(); ++j) {
    Liveness& l = out[watch.input_index(j)];
    bool inflight = watch.return_probes(j) == ReturnProbes::on;
    l.calls = counts[j].calls, l.calls_per_s = counts[j].calls / seconds, l.probed = true;
    l.inflight = inflight ? counts[j].inflight() : -1;
  }
  (void)liveness__threads_inside(pid, out);
  return out;
}

namespace {

// Functions seen but too rarely to give a rate yet: why the window goes on.
std::vector<size_t> unjudged(const std::vector<CallCounts>& counts, const Watch& watch) {
  std::vector<size_t> out;
  for (size_t j = 0; j < counts.size(); ++j)
    if (watch.observed(j) && counts[j].calls > 0 && counts[j].calls < ObserveWindow::kJudgeCalls) out.push_back(j);
  return out;
}

}  // namespace

Result<ObserveReport> liveness__observe_window(pid_t pid, const std::vector<Function>& functions,
                                               const ObserveWindow& how) {
  bool returns = probe__objects_with_exceptions(functions).empty();
  auto cost = probe_cost__measured();  // before attaching: its probes are on this program
  auto watch = HOTFIX_TRY(Watch::attach(pid, functions, WatchOptions{.returns = returns}));
  ObserveReport report;
  if (!cost) report.notes.push_back(fmt::format("no overhead budget: {}", cost.error().line()));
  std::optional<WatchBudget> budget;
  if (cost) budget.emplace(watch, *cost, how.max_overhead_pct);
  auto began = steady_clock::now();
  auto step = how.adaptive ? how.first : how.window;
  if (budget && !how.adaptive) step = std::min(how.window, how.first);  // the budget looks early too
  std::vector<CallCounts> counts;
  std::vector<double> rate(functions.size(), 0);
  std::string extended_for;  // the last function the window went on for  // calls/s, frozen for a function the budget dropped
  for (auto next = began + step;; next += step) {
    std::this_thread::sleep_until(std::min(next, began + how.window));
    counts = HOTFIX_TRY(watch.read());
    double seconds = duration<double>(steady_clock::now() - began).count();
    for (size_t j = 0; j < counts.size(); ++j)
      if (watch.observed(j)) rate[j] = counts[j].calls / seconds;
    report.seconds = seconds;
    bool at_bound = steady_clock::now() >= began + how.window;
    if (budget) {
      auto line = HOTFIX_TRY(budget->check(counts, seconds));
      if (!line.empty()) report.notes.push_back(line);
    }
    auto waiting = unjudged(counts, watch);
    if (at_bound || (how.adaptive && waiting.empty())) {
      if (!extended_for.empty())
        report.notes.push_back(fmt::format("observe window extended to {:.2f} s (at most {:.1f} s): {} had fewer than {} calls",
                                           seconds, duration<double>(how.window).count(), extended_for,
                                           ObserveWindow::kJudgeCalls));
      break;
    }
    if (how.adaptive && !waiting.empty()) extended_for = watch.functions()[waiting.front()].name;
  }
  for (auto& f : functions) report.functions.push_back({f, 0, 0, -1, false});
  for (size_t j = 0; j < counts.size(); ++j) {
    Liveness& l = report.functions[watch.input_index(j)];
    bool inflight = watch.return_probes(j) == ReturnProbes::on;
    l.calls = counts[j].calls, l.calls_per_s = rate[j], l.probed = true;
    l.inflight = inflight ? counts[j].inflight() : -1;
  }
  if (auto why = liveness__threads_inside(pid, report.functions); !why.empty()) report.notes.push_back(why);
  return report;
}

std::string liveness__threads_inside(pid_t pid, std::vector<Liveness>& functions) {
  std::vector<Function> fs;
  for (auto& l : functions) fs.push_back(l.function);
  auto seen = inside__snapshot(pid, fs);
  if (!seen) return fmt::format("threads inside: from the probes only (calls since they attached): {}", seen.error().line());
  for (size_t i = 0; i < functions.size(); ++i) {
    functions[i].inflight = seen->functions[i].threads;
    functions[i].inside_unknown = seen->functions[i].unknown;
  }
  return {};
}

namespace {

// The function's bytes as its file holds them (what a uprobe there would execute).
std::optional<std::vector<uint8_t>> file_code(pid_t pid, const Function& f) {
  UniqueFd fd(::open(uprobe__target_path(pid, f.object).c_str(), O_RDONLY | O_CLOEXEC));
  std::vector<uint8_t> code(std::min<uint64_t>(f.size, 1 << 16));
  if (!fd || code.empty() ||
      ::pread(fd.get(), code.data(), code.size(), static_cast<off_t>(f.offset)) != static_cast<ssize_t>(code.size()))
    return std::nullopt;
  return code;
}

Function probe_at(const Function& f, uint64_t file_offset) {
  Function p = f;
  p.address = f.address + (file_offset - f.offset);
  p.offset = file_offset;
  return p;
}

}  // namespace

Result<QuietWaiter> QuietWaiter::attach(pid_t pid, const std::vector<Function>& functions) {
  std::vector<Function> probes;
  std::vector<size_t> owner;
  std::vector<bool> exit;
  std::vector<Tracked> tracked(functions.size());
  for (size_t i = 0; i < functions.size(); ++i) {
    const Function& f = functions[i];
    auto code = file_code(pid, f);
    auto exits = patchcount__old_exits(pid, f, static_cast<uint32_t>(i));
    if (!code || !exits || exits->offsets.empty() || exits->unresolved) continue;  // cannot track: strict check decides
    auto entry = arch::check_entry(*code, f.address);
    if (!entry.patchable) continue;
    tracked[i] = {f.address, f.address + f.size, f.address + entry.covered};
    probes.push_back(probe_at(f, f.offset + entry.covered)), owner.push_back(i), exit.push_back(false);
    for (uint64_t off : exits->offsets) probes.push_back(probe_at(f, off)), owner.push_back(i), exit.push_back(true);
  }
  if (probes.empty()) return fail("no target function can be tracked by probes");
  auto watch = HOTFIX_TRY(Watch::attach(pid, probes, WatchOptions{.returns = false}));
  // A probe the kernel refused leaves its function untracked (its count would never drop):
  // a blocker there is "not seen", and the waiter then waits blindly, as for any untracked one.
  for (auto& s : watch.skipped())
    for (size_t p = 0; p < probes.size(); ++p)
      if (probes[p].offset == s.function.offset && probes[p].object == s.function.object) tracked[owner[p]] = {};
  std::vector<size_t> kept_owner;
  std::vector<bool> kept_exit;
  for (size_t j = 0; j < watch.functions().size(); ++j)
    kept_owner.push_back(owner[watch.input_index(j)]), kept_exit.push_back(exit[watch.input_index(j)]);
  return QuietWaiter(std::move(watch), std::move(kept_owner), std::move(kept_exit), std::move(tracked));
}

std::optional<std::vector<int64_t>> QuietWaiter::net() const {
  auto counts = watch_.read();
  if (!counts) return std::nullopt;
  std::vector<int64_t> inside(functions_.size(), 0);
  for (size_t p = 0; p < counts->size(); ++p)
    if (functions_[owner_[p]].begin < functions_[owner_[p]].end)  // untracked: its probes cannot tell
      inside[owner_[p]] += exit_[p] ? -static_cast<int64_t>((*counts)[p].calls) : static_cast<int64_t>((*counts)[p].calls);
  return inside;
}

bool QuietWaiter::seed(const std::vector<Inside>& blockers) {
  auto now = net();
  if (!now) return sees_all_ = false;
  base_ = *now;
  std::fill(seeded_.begin(), seeded_.end(), 0);
  sees_all_ = true;
  for (const Inside& b : blockers) {
    uint64_t at = b.innermost ? b.pc : b.pc - 1;  // a return address may be one past the body (noreturn call)
    auto f = std::find_if(functions_.begin(), functions_.end(),
                          [&](const Tracked& t) { return t.begin < t.end && at >= t.begin && at < t.end; });
    if (f == functions_.end()) {
      sees_all_ = false;  // untracked function, or an unwinder guess without a pc
      continue;
    }
    // Still in the bytes before the body probe: it will be counted when it passes it.
    if (b.innermost && b.pc < f->counted_from) continue;
    seeded_[static_cast<size_t>(f - functions_.begin())]++;
  }
  return sees_all_;
}

bool QuietWaiter::wait_quiet(steady_clock::time_point deadline) {
  for (;;) {
    auto now = net();
    if (!now) return true;  // cannot tell: let the stop-the-world check decide
    bool quiet = true;
    // Below zero: threads inside before the seed that the stop did not see (it sees them all,
    // but a waiter seeded at attach may be behind) have left since.
    for (size_t i = 0; i < now->size(); ++i) quiet &= seeded_[i] + (*now)[i] - base_[i] <= 0;
    if (quiet) return true;
    auto t = steady_clock::now();
    if (t >= deadline) return false;
    // Busy functions open gaps of a fraction of a millisecond: poll fast. Nobody has entered
    // or left for a while (a thread parked in an event loop): a millisecond is soon enough,
    // and the poll's system calls stop costing the machine a fifth of a CPU.
    if (*now != last_net_) last_net_ = *now, last_change_ = t;
    std::this_thread::sleep_for(t - last_change_ < milliseconds(20) ? microseconds(50) : milliseconds(1));
  }
}

}  // namespace hotfix
