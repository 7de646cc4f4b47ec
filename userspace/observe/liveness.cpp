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
#include "common/crashpoint.hpp"
#include "patch/watchstubs.hpp"

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

// Where each asked function's calls are counted during the window, and their totals.
class WindowCounters {
 public:
  WindowCounters(pid_t pid, const std::vector<Function>& functions, const ObserveWindow& how)
      : pid_(pid), functions_(functions), how_(how), stub_(functions.size()), probe_(functions.size()),
        moved_(functions.size()) {}

  // Trampolines for every function that can take one (one stop); the rest go to uprobes.
  Result<void> start(std::vector<std::string>& notes) {
    std::vector<size_t> rest;
    if (how_.trampolines) {
      std::vector<TrampolineRefusal> refused;
      auto installed = WatchStubs::install(pid_, functions_, WatchStubOptions{.timeout = how_.install_timeout}, refused);
      if (!installed) {
        notes.push_back(fmt::format("no counting trampolines: {}; the window counts with uprobes",
                                    installed.error().what));
      } else {
        stubs_.emplace(std::move(*installed));
        for (size_t k = 0; k < stubs_->functions().size(); ++k) stub_[index_of(stubs_->functions()[k])] = k;
        if (!refused.empty()) notes.push_back(watchstubs__refused_line(refused));
      }
    }
    for (size_t i = 0; i < functions_.size(); ++i)
      if (!stub_[i]) rest.push_back(i);
    if (rest.empty()) return {};
    std::vector<Function> probed;
    for (size_t i : rest) probed.push_back(functions_[i]);
    bool returns = probe__objects_with_exceptions(probed).empty();  // Go code: Watch never gives it any
    auto cost = probe_cost__measured();  // before attaching: its probes are on this program
    watch_.emplace(HOTFIX_TRY(Watch::attach(pid_, probed, WatchOptions{.returns = returns})));
    for (size_t j = 0; j < watch_->functions().size(); ++j) probe_[rest[watch_->input_index(j)]] = j;
    if (!cost) {
      notes.push_back(fmt::format("no overhead budget: {}", cost.error().line()));
      return {};
    }
    budget_.emplace(*watch_, *cost, how_.max_overhead_pct);
    // In uprobe mode the budget moves the hottest functions to trampolines. With trampolines
    // already on, the uprobed ones are those that cannot take one: the budget drops them.
    if (!how_.trampolines)
      budget_->move_to_trampoline = [this](const std::vector<size_t>& which) { return move(which); };
    return {};
  }

  // Read every source; the budget looks at the uprobes' counts (and may cut or move them).
  Result<void> sample(double seconds, std::vector<std::string>& notes) {
    if (watch_) probe_counts_ = HOTFIX_TRY(watch_->read());
    totals_.assign(functions_.size(), 0);
    std::vector<uint64_t> stubbed = stubs_ ? stubs_->read() : std::vector<uint64_t>{};
    std::vector<uint64_t> moved = moved_stubs_ ? moved_stubs_->read() : std::vector<uint64_t>{};
    for (size_t i = 0; i < functions_.size(); ++i) {
      if (stub_[i]) totals_[i] += stubbed[*stub_[i]];
      if (probe_[i]) totals_[i] += probe_counts_[*probe_[i]].calls;  // frozen once dropped or moved
      if (moved_[i]) totals_[i] += moved[*moved_[i]];
    }
    if (rates_.empty()) rates_.assign(functions_.size(), 0);
    for (size_t i = 0; i < functions_.size(); ++i)
      if (observing(i)) rates_[i] = static_cast<double>(totals_[i]) / seconds;
    if (budget_) {
      auto line = HOTFIX_TRY(budget_->check(probe_counts_, seconds));
      if (!line.empty()) notes.push_back(line);
    }
    return {};
  }

  // Still counting function i (not dropped by the budget, not refused by the kernel).
  bool observing(size_t i) const {
    return stub_[i] || moved_[i] || (probe_[i] && watch_->observed(*probe_[i]));
  }
  uint64_t total(size_t i) const { return totals_[i]; }

  // Uprobes off, then the trampolines' entries back to the file's bytes (one stop each set);
  // their memory is freed once no thread can be inside it.
  Result<void> stop(std::vector<std::string>& notes) {
    budget_.reset();
    if (watch_) watch_->detach();
    for (auto* s : {&stubs_, &moved_stubs_}) {
      if (!*s) continue;
      auto removed = (*s)->remove(std::chrono::seconds(1));
      if (!removed)
        return fail(fmt::format("cannot remove the observe window's counting trampolines from pid {}: {}", pid_,
                                removed.error().what),
                    fmt::format("nothing was patched; run `hotfix-ctl recover --pid {}`, then retry", pid_));
      for (auto& n : *removed) notes.push_back(n);
    }
    return {};
  }

  std::vector<Liveness> report() const {
    std::vector<Liveness> out;
    for (size_t i = 0; i < functions_.size(); ++i) {
      Liveness l{functions_[i], totals_.empty() ? 0 : totals_[i], rates_.empty() ? 0 : rates_[i], -1, false};
      l.trampoline = stub_[i] || moved_[i];
      l.probed = l.trampoline || probe_[i];  // not probed: the kernel refused it (calls unknown)
      if (probe_[i] && !moved_[i] && watch_->return_probes(*probe_[i]) == ReturnProbes::on)
        l.inflight = probe_counts_[*probe_[i]].inflight();
      out.push_back(std::move(l));
    }
    return out;
  }
  size_t trampolines() const { return static_cast<size_t>(std::count_if(stub_.begin(), stub_.end(), [](auto& s) { return s.has_value(); })) + moved_count_; }
  size_t uprobes() const { return watch_ ? watch_->functions().size() : 0; }

 private:
  size_t index_of(const Function& f) const {
    for (size_t i = 0; i < functions_.size(); ++i)
      if (functions_[i].address == f.address) return i;
    return 0;  // unreachable: WatchStubs and Watch hand back functions they were given
  }

  // The budget's move: their uprobes are detached already. One batch per window (every
  // WatchStubs of a process shares its journal op); a later batch is dropped instead.
  std::vector<bool> move(const std::vector<size_t>& which) {
    std::vector<bool> ok(which.size(), false);
    if (moved_stubs_) return ok;
    std::vector<Function> fs;
    for (size_t j : which) fs.push_back(watch_->functions()[j]);
    std::vector<TrampolineRefusal> refused;
    auto installed = WatchStubs::install(pid_, fs, WatchStubOptions{.timeout = how_.install_timeout}, refused);
    if (!installed) return ok;
    moved_stubs_.emplace(std::move(*installed));
    for (size_t k = 0; k < moved_stubs_->functions().size(); ++k) {
      size_t i = index_of(moved_stubs_->functions()[k]);
      moved_[i] = k;
      for (size_t m = 0; m < which.size(); ++m)
        if (probe_[i] && *probe_[i] == which[m]) ok[m] = true;
    }
    moved_count_ = moved_stubs_->functions().size();
    return ok;
  }

  pid_t pid_;
  const std::vector<Function>& functions_;
  const ObserveWindow& how_;
  std::optional<WatchStubs> stubs_, moved_stubs_;
  std::optional<Watch> watch_;
  std::optional<WatchBudget> budget_;
  std::vector<std::optional<size_t>> stub_, probe_, moved_;  // by asked index: slot in each source
  std::vector<CallCounts> probe_counts_;
  std::vector<uint64_t> totals_;
  std::vector<double> rates_;  // calls/s, frozen for a function the budget dropped
  size_t moved_count_ = 0;
};

}  // namespace

Result<ObserveReport> liveness__observe_window(pid_t pid, const std::vector<Function>& functions,
                                               const ObserveWindow& how) {
  ObserveReport report;
  WindowCounters counters(pid, functions, how);
  HOTFIX_CHECK(counters.start(report.notes));
  crashpoint("observe: in the window");  // a killed patch here leaves trampolines for the next hotfix-ctl
  auto began = steady_clock::now();
  auto step = how.adaptive ? how.first : std::min(how.window, how.first);  // the budget looks early too
  if (counters.uprobes() > 0 && ObserveWindow::kEarlyBudgetLook < step) {
    std::this_thread::sleep_until(std::min(began + ObserveWindow::kEarlyBudgetLook, began + how.window));
    HOTFIX_CHECK(counters.sample(duration<double>(steady_clock::now() - began).count(), report.notes));
  }
  std::string extended_for;  // the last function the window went on for
  for (auto next = began + step;; next += step) {
    std::this_thread::sleep_until(std::min(next, began + how.window));
    double seconds = duration<double>(steady_clock::now() - began).count();
    HOTFIX_CHECK(counters.sample(seconds, report.notes));
    report.seconds = seconds;
    bool at_bound = steady_clock::now() >= began + how.window;
    // Functions seen but too rarely to give a rate yet: why the window goes on.
    std::optional<size_t> waiting;
    for (size_t i = 0; i < functions.size() && !waiting; ++i)
      if (counters.observing(i) && counters.total(i) > 0 && counters.total(i) < ObserveWindow::kJudgeCalls) waiting = i;
    if (at_bound || (how.adaptive && !waiting)) {
      if (!extended_for.empty())
        report.notes.push_back(fmt::format("observe window extended to {:.2f} s (at most {:.1f} s): {} had fewer than {} calls",
                                           seconds, duration<double>(how.window).count(), extended_for,
                                           ObserveWindow::kJudgeCalls));
      break;
    }
    if (how.adaptive && waiting) extended_for = functions[*waiting].name;
  }
  report.trampolines = counters.trampolines();
  report.uprobes = counters.uprobes();
  report.functions = counters.report();
  HOTFIX_CHECK(counters.stop(report.notes));
  // Threads inside at the window's end, from one look at every thread (after the stubs are
  // gone, so no stack runs through a stub page): the same answer for trampolines and uprobes.
  if (auto why = liveness__threads_inside(pid, report.functions); !why.empty()) report.notes.push_back(why);
  return report;
}

std::string liveness__threads_inside(pid_t pid, std::vector<Liveness>& functions) {
  std::vector<Function> fs;
  for (auto& l : functions) fs.push_back(l.function);
  auto seen = inside__snapshot(pid, fs);
  if (!seen) return fmt::format("threads inside: from the probes only (calls since they attached): {}", seen.error().line());
  for (size_t i = 0; i < functions.size(); ++i) {
    // A goroutine parked off its thread runs on no stack a look at threads can see: a Go
    // function's count would read 0 where it is unknown, so it stays unmeasured (n/a).
    if (probe__is_go_object(functions[i].function.object)) continue;
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
