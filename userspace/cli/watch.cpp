// hotfix-ctl watch: live call counts, in-flight threads and latency of functions (uprobes).
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "cli/cli.hpp"
#include "cli/stop.hpp"
#include "cli/targets.hpp"
#include "common/unique_fd.hpp"
#include "observe/budget.hpp"
#include "observe/inside.hpp"
#include "observe/liveness.hpp"
#include "observe/report.hpp"
#include "observe/probe_safety.hpp"
#include "observe/watch.hpp"
#include "patch/registry.hpp"
#include "patch/watchstubs.hpp"
#include "process/maps.hpp"
#include "process/pidns.hpp"
#include "process/targets.hpp"
#include "symbols/pattern.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis = "--pid PID PATTERN... [--object NAME] [--count trampoline|uprobe] [--interval SEC] [--duration SEC] [--json] [--top N] [--inflight] [--max-overhead PCT]";

// Shown under --help: what a probe costs the target, measured (docs/performance.md).
constexpr const char* kCost =
    "\ncounting: by default (--count trampoline) each watched function's entry jumps to a counting\n"
    "trampoline in the target (one atomic add, no trap; a few ns per call), removed when watch ends\n"
    "-- or, if watch is killed, by the next hotfix-ctl on the pid. A function whose prologue cannot\n"
    "be moved, one patched by hotfix, Go code, or an entry holding someone else's breakpoint is\n"
    "counted by a uprobe instead (named in one note). --inflight (in-flight and latency) needs\n"
    "return probes and so uprobes for every function; --count uprobe uses them for counting too.\n"
    "\ncost of uprobes: every call of a function watched by uprobe traps into the kernel. Per call, entry probe, on a\n"
    "quiet 2-CPU VM: ~12 us on an ordinary prologue (int3 + single-step), ~0.9 us when the\n"
    "first instruction is an emulated push, ~0.7 us on a 5-byte nop; several times more on a\n"
    "loaded machine. A return probe roughly doubles it; --no-inflight drops the return probes\n"
    "(no in-flight or latency columns). Watch hot functions briefly. See docs/performance.md.\n"
    "\nbudget: watch estimates its own cost (calls/s x this machine's measured cost of a hit) and\n"
    "keeps it under --max-overhead (default 2% of one CPU): the hottest functions lose their\n"
    "return probe, then (--count uprobe) move to a counting trampoline, else lose their probes\n"
    "(their counts stop there); one note says which.\n"
    "\nexceptions: a C++ exception thrown through a function watched with return probes terminates\n"
    "the target (the uretprobe trampoline has no unwind info). So return probes are off by default\n"
    "for functions of objects with C++ exception tables; --inflight turns them on when you know\n"
    "the watched functions do not propagate exceptions.\n"
    "\nGo: Go code never gets return probes (the Go runtime moves goroutine stacks and dies on a\n"
    "uretprobe's return address): its in-flight and latency show n/a (Go), --inflight or not.\n"
    "\nunprobeable functions: a function whose first instruction the kernel cannot probe (e.g. a\n"
    "`lock`-prefixed one) is left out and named in one note; the others are watched.\n";

struct WatchArgs {
  pid_t pid = 0;
  std::vector<std::string> patterns;
  std::string object;
  double interval = 1.0;
  double duration = 0;  // 0 = until Ctrl-C or the target exits
  bool json = false;
  size_t top = 20;
  std::optional<bool> inflight;  // unset: off with trampolines; with uprobes on unless an object has C++ exception tables
  bool trampolines = true;       // --count trampoline (the default) or uprobe
  double max_overhead = kDefaultMaxOverheadPct;  // % of one CPU the uprobes may cost the target
};

std::optional<int> parse_watch(const Args& args, WatchArgs& out) {
  po::options_description desc("options");
  desc.add_options()
      ("pid,p", po::value<int>()->required(), "process to watch")
      ("pattern", po::value<std::vector<std::string>>(), "functions: names, Class::method, scale(int), globs like 'pricing::*'")
      ("object", po::value<std::string>(), "only functions of this object (basename or path, e.g. libfoo.so)")
      ("count", po::value<std::string>()->default_value("trampoline"), "how calls are counted: trampoline (no trap, the default) or uprobe")
      ("interval,i", po::value<double>()->default_value(1.0), "seconds between reports")
      ("duration,d", po::value<double>()->default_value(0), "stop after this many seconds (default: until Ctrl-C or the target exits)")
      ("json", "one JSON object per line per interval, and a final one with \"final\":true")
      ("top", po::value<long>()->default_value(20), "table rows: with more functions than this, the busiest N (never-called ones hidden, and counted); 0 = all")
      ("inflight", "return probes even on C++ code (in-flight and latency; unsafe if an exception crosses them)")
      ("no-inflight", "entry probes only: cheaper, no in-flight or latency, safe for code that throws")
      ("max-overhead", po::value<double>()->default_value(kDefaultMaxOverheadPct),
       "budget: % of one CPU the probes may cost the target (estimated: calls/s x measured cost of a hit); "
       "above it the hottest functions lose their return probe, then their probes, and one line says so");
  add_target_options(desc);
  po::variables_map vm;
  if (auto code = parse("watch", args, desc, "pattern", vm, kSynopsis)) {
    if (*code == 0) fmt::print("{}", kCost);
    return code;
  }
  auto usage = [](std::string what) {
    return report(Error{std::move(what), fmt::format("usage: hotfix-ctl watch {} (see --help)", kSynopsis), 2});
  };
  out.pid = vm["pid"].as<int>();
  if (vm.count("pattern")) out.patterns = vm["pattern"].as<std::vector<std::string>>();
  if (out.patterns.empty()) return usage("watch needs at least one function pattern");
  if (vm.count("object")) out.object = vm["object"].as<std::string>();
  out.interval = vm["interval"].as<double>();
  out.duration = vm["duration"].as<double>();
  if (!(out.interval > 0) || !std::isfinite(out.interval)) return usage(fmt::format("bad --interval {}: give a positive number of seconds", out.interval));
  if (!(out.duration >= 0) || !std::isfinite(out.duration)) return usage(fmt::format("bad --duration {}: give a number of seconds >= 0", out.duration));
  out.json = vm.count("json") > 0;
  if (long top = vm["top"].as<long>(); top < 0) return usage(fmt::format("bad --top {}: give a number of rows >= 0", top));
  else out.top = static_cast<size_t>(top);
  if (vm.count("inflight") && vm.count("no-inflight")) return usage("--inflight and --no-inflight exclude each other");
  if (auto c = vm["count"].as<std::string>(); c == "uprobe") out.trampolines = false;
  else if (c != "trampoline") return usage(fmt::format("bad --count {}: give trampoline or uprobe", c));
  if (vm.count("inflight")) out.inflight = true;
  if (vm.count("no-inflight")) out.inflight = false;
  out.max_overhead = vm["max-overhead"].as<double>();
  if (!(out.max_overhead > 0) || !std::isfinite(out.max_overhead))
    return usage(fmt::format("bad --max-overhead {}: give a share of one CPU in percent, > 0", out.max_overhead));
  return std::nullopt;
}

// A pre-fork server's master (nginx, a pre-fork Apache) calls nothing: its children, running
// the same program, do the work. Say so when a watch saw no call at all.
void hint_children(pid_t pid, const std::vector<CallCounts>& totals) {
  for (auto& c : totals)
    if (c.calls) return;
  auto exe_of = [](pid_t p) {
    struct stat st {};
    if (::stat(fmt::format("/proc/{}/exe", p).c_str(), &st) != 0) return std::pair<dev_t, ino_t>{0, 0};
    return std::pair<dev_t, ino_t>{st.st_dev, st.st_ino};
  };
  std::vector<pid_t> same;
  for (pid_t child : targets__descendants(pid))
    if (exe_of(child) == exe_of(pid) && exe_of(pid).second) same.push_back(child);
  if (same.empty()) return;
  fmt::print(stderr, "note: pid {} made no call, but {} of its child process(es) run the same program (pid {}{}): the "
             "work is probably theirs (a master and its workers); watch them too with --children\n",
             pid, same.size(), same.front(), same.size() > 1 ? ", ..." : "");
}

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void print_sample(const WatchSample& s, bool json) {
  if (json)
    fmt::print("{}\n", watch__format_json(s));
  else
    fmt::print("{}\n", watch__format_table(s));
  std::fflush(stdout);
}

// The mechanisms in the banner: "trampolines", "uprobe_multi", "trampolines (3) and uprobe_multi (1)".
std::string mechanisms(size_t trampolines, const std::optional<Watch>& watch) {
  size_t probed = watch ? watch->functions().size() : 0;
  std::string probes = watch ? probe_mechanism__name(watch->mechanism()) : "";
  if (!probed) return "trampolines";
  if (!trampolines) return probes;
  return fmt::format("trampolines ({}) and {} ({})", trampolines, probes, probed);
}

// "in-flight includes 1 thread already inside (a look at 7 threads: 6 read without stopping,
// 1 stopped alone for 0.2 ms)".
std::string seed_line(const InsideSnapshot& s) {
  std::string stopped = s.stopped ? fmt::format(", {} stopped alone for at most {:.1f} ms", s.stopped,
                                                std::chrono::duration<double, std::milli>(s.longest_stop).count())
                                  : std::string();
  size_t inside = s.threads.size();
  return fmt::format("in-flight includes threads already inside when the probes came: {} thread{} inside or unknown "
                     "(a look at {} thread{}: {} read without stopping{})",
                     inside, inside == 1 ? "" : "s", s.looked_at, s.looked_at == 1 ? "" : "s", s.read_blocked, stopped);
}

int run_watch(const WatchArgs& a) {
  if (auto ok = process__check_privileges(true, a.trampolines); !ok) return report(ok.error());
  auto stop = StopSources::open(a.pid);
  if (!stop) return report(stop.error());
  if (auto alive = process__check_alive(a.pid); !alive) return report(alive.error());
  if (!recover_first(a.pid, true)) return 1;  // trampolines a killed watch left go first
  auto table = SymbolTable::for_pid(a.pid);
  if (!table) return report(table.error());
  auto functions = symbols__select(*table, a.patterns, SelectOptions{a.object});
  if (!functions) return report(functions.error());
  auto registry = registry__read(a.pid);
  if (!registry) return report(registry.error());
  std::vector<std::string> notes;
  auto live = registry__live_functions(*registry, *table, std::move(*functions), kFixCopyPrefix, &notes);
  if (live.empty()) return report(Error{"every matching function is a fix library's copy", "name the original functions"});
  // Trampolines count; in-flight and latency need return probes, and so uprobes.
  bool inflight = a.inflight.value_or(!a.trampolines);
  bool trampolines = a.trampolines && !inflight;
  if (a.trampolines && inflight)
    notes.push_back("--inflight: every function is watched with uprobes (return probes), not trampolines");
  if (trampolines && live.size() > kMaxWatchTrampolines) {
    trampolines = false;
    notes.push_back(fmt::format("{} functions match: they are counted by uprobes (one watch installs at most {} "
                                "trampolines; narrow the pattern for trap-free counting)", live.size(), kMaxWatchTrampolines));
  }
  auto go = probe__go_objects(live);
  if (!a.inflight && inflight) {
    auto risky = probe__objects_with_exceptions(live);
    std::erase_if(risky, [&](const std::string& o) { return std::find(go.begin(), go.end(), o) != go.end(); });
    if (!risky.empty()) {
      inflight = false;
      notes.push_back(fmt::format("in-flight and latency are off: {} has C++ exception tables, and an exception "
                                  "unwinding through a return probe terminates the process (--inflight forces them)",
                                  risky.front()));
    }
  }
  if (!go.empty())
    notes.push_back(fmt::format("in-flight and latency are n/a for Go code ({}): a return probe kills a Go program, "
                                "which moves goroutine stacks; calls are counted{}",
                                go.front(), a.inflight.value_or(false) ? " (--inflight does not apply to Go)" : ""));
  for (auto& note : notes) fmt::print(stderr, "note: {}\n", note);
  auto progress = [](const std::string& line) { fmt::print(stderr, "progress: {}\n", line); };
  auto t0 = std::chrono::steady_clock::now();
  std::optional<WatchStubs> stubs;
  std::vector<Function> probed = live;
  if (trampolines) {
    std::vector<TrampolineRefusal> refused;
    auto installed = WatchStubs::install(a.pid, live, WatchStubOptions{.progress = progress}, refused);
    if (!installed) return report(installed.error());
    stubs.emplace(std::move(*installed));
    for (auto& n : stubs->notes()) fmt::print(stderr, "note: {}\n", n);
    probed.clear();
    for (auto& r : refused) probed.push_back(r.function);
    if (!refused.empty()) fmt::print(stderr, "note: {}\n", watchstubs__refused_line(refused));
  }
  // --count uprobe: the budget moves the hottest functions here (one batch, see limits.md).
  std::optional<WatchStubs> moved;
  std::vector<std::optional<size_t>> moved_slot;  // by watch function index: its slot in `moved`
  auto remove_stubs = [&] {
    int code = 0;
    for (auto* s : {&stubs, &moved}) {
      if (!*s) continue;
      auto removed = (*s)->remove(std::chrono::seconds(60), progress);
      s->reset();
      if (!removed) code = report(removed.error());
      else for (auto& n : *removed) fmt::print(stderr, "note: {}\n", n);
    }
    return code;
  };
  std::optional<Watch> watch;
  // Measured before attaching (its own probes are on this program, not on the target).
  auto cost = probed.empty() ? Result<ProbeCost>(ProbeCost{}) : probe_cost__measured();
  if (!cost) fmt::print(stderr, "note: no overhead budget: {}\n", cost.error().line());
  if (!probed.empty()) {
    auto attached = Watch::attach(a.pid, std::move(probed), WatchOptions{.returns = inflight, .progress = progress});
    if (!attached) {
      int code = report(attached.error());
      remove_stubs();
      return code;
    }
    watch.emplace(std::move(*attached));
    if (!watch->skipped().empty()) fmt::print(stderr, "note: {}\n", watch__skipped_line(watch->skipped()));
  }
  // Threads already inside when the probes came: one look at every thread seeds in-flight.
  std::optional<InflightSeed> seed;
  if (watch && watch->returns()) {
    auto taken = InflightSeed::take(a.pid, *watch);
    if (!taken) fmt::print(stderr, "note: in-flight counts only calls since attach: {}\n", taken.error().line());
    else seed.emplace(std::move(*taken));
    if (seed) fmt::print(stderr, "note: {}\n", seed_line(seed->first()));
    if (seed) for (auto& n : seed->notes()) fmt::print(stderr, "note: in-flight: {}\n", n);
  }
  // Rows: the trampolines' functions first, then the probed ones.
  std::vector<Function> all = stubs ? stubs->functions() : std::vector<Function>{};
  size_t ntramp = all.size();
  WatchSample sample;
  sample.returns.assign(ntramp, ReturnProbes::off);
  if (watch)
    for (size_t i = 0; i < watch->functions().size(); ++i) {
      all.push_back(watch->functions()[i]);
      sample.returns.push_back(watch->return_probes(i));
    }
  auto read_counts = [&]() -> Result<std::vector<CallCounts>> {
    std::vector<CallCounts> out;
    if (stubs)
      for (uint64_t c : stubs->read()) out.push_back(CallCounts{.calls = c});
    if (watch) {
      auto probes = HOTFIX_TRY(watch->read());
      if (moved) {  // a moved function's row: its uprobe count (frozen) and its trampoline's since
        auto more = moved->read();
        for (size_t i = 0; i < probes.size() && i < moved_slot.size(); ++i)
          if (moved_slot[i]) probes[i].calls += more[*moved_slot[i]];
      }
      out.insert(out.end(), probes.begin(), probes.end());
    }
    return out;
  };
  auto n = all.size();
  // In-flight from before the probes, per row (the probed rows follow the trampolines').
  auto fill_seed = [&] {
    if (!seed) return;
    if (auto r = seed->refresh(*watch); !r) {
      fmt::print(stderr, "note: in-flight: threads inside from before attach no longer followed: {}\n", r.error().line());
      seed.reset();
      sample.seeded.clear(), sample.seeded_unknown.clear();
      return;
    }
    sample.seeded.assign(n, 0), sample.seeded_unknown.assign(n, 0);
    for (size_t i = 0; i < watch->functions().size(); ++i)
      sample.seeded[ntramp + i] = seed->seeded(i), sample.seeded_unknown[ntramp + i] = seed->unknown(i);
  };
  double attach_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  fmt::print(stderr, "watching {} function{} in pid {} ({}) via {}, attached in {:.1f} ms; Ctrl-C to stop\n", n,
             n == 1 ? "" : "s", a.pid, pidns__comm_label(a.pid), mechanisms(ntramp, watch), attach_ms);

  using clock = std::chrono::steady_clock;
  auto interval = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(a.interval));
  auto start = clock::now();
  auto end = a.duration > 0 ? start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(a.duration))
                            : clock::time_point::max();
  std::vector<CallCounts> previous(n);
  auto last_tick = start;
  sample.inflight_known = inflight;
  sample.top = a.top;
  sample.functions = &all;
  int exit_code = 0;
  // The uprobes' overhead budget (trampolines cost a few ns a call: not budgeted). It looks
  // once soon after attach (a hot function costs most before the first report), then at
  // every report; the uprobed functions' counts follow the trampolines' in `counts`.
  std::optional<WatchBudget> budget;
  if (watch && cost) budget.emplace(*watch, *cost, a.max_overhead);
  // With --count uprobe every function could take a trampoline: the budget moves the hottest
  // there (their uprobes are detached first). With trampolines on, the uprobed ones cannot.
  if (budget && !a.trampolines)
    budget->move_to_trampoline = [&](const std::vector<size_t>& which) {
      std::vector<bool> ok(which.size(), false);
      if (moved) return ok;  // one batch per watch
      std::vector<Function> fs;
      for (size_t j : which) fs.push_back(watch->functions()[j]);
      std::vector<TrampolineRefusal> refused;
      auto installed = WatchStubs::install(a.pid, fs, WatchStubOptions{.timeout = std::chrono::seconds(1)}, refused);
      if (!installed) {
        fmt::print(stderr, "note: cannot move functions to trampolines: {}\n", installed.error().line());
        return ok;
      }
      moved.emplace(std::move(*installed));
      moved_slot.assign(watch->functions().size(), std::nullopt);
      for (size_t k = 0; k < moved->functions().size(); ++k)
        for (size_t m = 0; m < which.size(); ++m)
          if (watch->functions()[which[m]].address == moved->functions()[k].address) ok[m] = true, moved_slot[which[m]] = k;
      return ok;
    };
  // The budget's first look comes early (as in patch's window): until then every hit of a hot
  // uprobed function traps, and the budget can only cut what it has seen.
  auto early = budget ? start + ObserveWindow::kEarlyBudgetLook : clock::time_point::max();
  auto keep_budget = [&](const std::vector<CallCounts>& counts, double seconds) {
    if (!budget) return true;
    std::vector<CallCounts> probed_counts(counts.begin() + static_cast<long>(ntramp), counts.end());
    auto line = budget->check(probed_counts, seconds);
    if (!line) return report(line.error()), false;
    if (!line->empty()) fmt::print(stderr, "note: {}\n", *line);
    for (size_t i = 0; i < watch->functions().size(); ++i) sample.returns[ntramp + i] = watch->return_probes(i);
    return true;
  };
  for (auto next = start + interval;;) {
    bool early_due = early < next;
    Wake why = wait_until(*stop, std::min(early_due ? early : next, end));
    auto counts = read_counts();
    if (!counts) {
      exit_code = report(counts.error());
      break;
    }
    if (why == Wake::tick && clock::now() < end && early_due) {
      early = clock::time_point::max();
      if (!keep_budget(*counts, std::chrono::duration<double>(clock::now() - start).count())) {
        exit_code = 1;
        break;
      }
      continue;
    }
    if (why == Wake::tick && clock::now() < end) {
      next += interval;
      sample.time = unix_now();
      sample.interval_s = std::chrono::duration<double>(clock::now() - last_tick).count();
      last_tick = clock::now();
      sample.total = *counts;
      sample.interval = *counts;
      for (size_t i = 0; i < n; ++i) sample.interval[i] -= previous[i];
      previous = *counts;
      fill_seed();
      print_sample(sample, a.json);
      if (!keep_budget(sample.interval, sample.interval_s)) {
        exit_code = 1;
        break;
      }
      continue;
    }
    if (why == Wake::target_exited) fmt::print(stderr, "pid {} exited\n", a.pid);
    sample.final = true;
    sample.time = unix_now();
    sample.interval_s = std::chrono::duration<double>(clock::now() - start).count();
    sample.total = sample.interval = *counts;
    if (why != Wake::target_exited) fill_seed();
    else sample.seeded.clear(), sample.seeded_unknown.clear();
    print_sample(sample, a.json);
    hint_children(a.pid, *counts);
    break;
  }
  if (watch) watch->detach();
  if (int code = remove_stubs(); code && !exit_code) exit_code = code;
  return exit_code;
}

}  // namespace

int verb_watch(const Args& args) {
  if (auto code = run_for_targets("watch", args)) return *code;
  WatchArgs a;
  if (auto code = parse_watch(args, a)) return *code;
  return run_watch(a);
}

}  // namespace hotfix::cli
