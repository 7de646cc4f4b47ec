// hotfix-ctl watch: live call counts, in-flight threads and latency of functions (uprobes).
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "cli/cli.hpp"
#include "cli/stop.hpp"
#include "common/unique_fd.hpp"
#include "observe/report.hpp"
#include "observe/probe_safety.hpp"
#include "observe/watch.hpp"
#include "patch/registry.hpp"
#include "process/maps.hpp"
#include "process/pidns.hpp"
#include "symbols/pattern.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis = "--pid PID PATTERN... [--object NAME] [--interval SEC] [--duration SEC] [--json] [--top N] [--no-inflight]";

// Shown under --help: what a probe costs the target, measured (docs/performance.md).
constexpr const char* kCost =
    "\ncost: every call of a watched function traps into the kernel. Per call, entry probe, on a\n"
    "quiet 2-CPU VM: ~12 us on an ordinary prologue (int3 + single-step), ~0.9 us when the\n"
    "first instruction is an emulated push, ~0.7 us on a 5-byte nop; several times more on a\n"
    "loaded machine. A return probe roughly doubles it; --no-inflight drops the return probes\n"
    "(no in-flight or latency columns). Watch hot functions briefly. See docs/performance.md.\n"
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
  std::optional<bool> inflight;  // unset: on unless an object has C++ exception tables
};

std::optional<int> parse_watch(const Args& args, WatchArgs& out) {
  po::options_description desc("options");
  desc.add_options()
      ("pid,p", po::value<int>()->required(), "process to watch")
      ("pattern", po::value<std::vector<std::string>>(), "functions: names, Class::method, scale(int), globs like 'pricing::*'")
      ("object", po::value<std::string>(), "only functions of this object (basename or path, e.g. libfoo.so)")
      ("interval,i", po::value<double>()->default_value(1.0), "seconds between reports")
      ("duration,d", po::value<double>()->default_value(0), "stop after this many seconds (default: until Ctrl-C or the target exits)")
      ("json", "one JSON object per line per interval, and a final one with \"final\":true")
      ("top", po::value<long>()->default_value(20), "table rows: with more functions than this, the busiest N (never-called ones hidden, and counted); 0 = all")
      ("inflight", "return probes even on C++ code (in-flight and latency; unsafe if an exception crosses them)")
      ("no-inflight", "entry probes only: cheaper, no in-flight or latency, safe for code that throws");
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
  if (vm.count("inflight")) out.inflight = true;
  if (vm.count("no-inflight")) out.inflight = false;
  return std::nullopt;
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

int run_watch(const WatchArgs& a) {
  if (auto ok = process__check_privileges(true, false); !ok) return report(ok.error());
  auto stop = StopSources::open(a.pid);
  if (!stop) return report(stop.error());
  if (auto alive = process__check_alive(a.pid); !alive) return report(alive.error());
  auto table = SymbolTable::for_pid(a.pid);
  if (!table) return report(table.error());
  auto functions = symbols__select(*table, a.patterns, SelectOptions{a.object});
  if (!functions) return report(functions.error());
  auto registry = registry__read(a.pid);
  if (!registry) return report(registry.error());
  std::vector<std::string> notes;
  auto live = registry__live_functions(*registry, *table, std::move(*functions), kFixCopyPrefix, &notes);
  if (live.empty()) return report(Error{"every matching function is a fix library's copy", "name the original functions"});
  bool inflight = a.inflight.value_or(true);
  auto go = probe__go_objects(live);
  if (!a.inflight) {
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
  auto watch = Watch::attach(a.pid, std::move(live), WatchOptions{.returns = inflight, .progress = progress});
  if (!watch) return report(watch.error());
  if (!watch->skipped().empty()) fmt::print(stderr, "note: {}\n", watch__skipped_line(watch->skipped()));

  auto n = watch->functions().size();
  fmt::print(stderr, "watching {} function{} in pid {} ({}) via {}, attached in {:.1f} ms; Ctrl-C to stop\n", n,
             n == 1 ? "" : "s", a.pid, pidns__comm_label(a.pid), probe_mechanism__name(watch->mechanism()), watch->attach_ms());

  using clock = std::chrono::steady_clock;
  auto interval = std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(a.interval));
  auto start = clock::now();
  auto end = a.duration > 0 ? start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(a.duration))
                            : clock::time_point::max();
  std::vector<CallCounts> previous(n);
  auto last_tick = start;
  WatchSample sample;
  sample.inflight_known = inflight;
  sample.top = a.top;
  sample.functions = &watch->functions();
  for (size_t i = 0; i < n; ++i) sample.returns.push_back(watch->return_probes(i));
  int exit_code = 0;
  for (auto next = start + interval;; next += interval) {
    Wake why = wait_until(*stop, std::min(next, end));
    auto counts = watch->read();
    if (!counts) {
      exit_code = report(counts.error());
      break;
    }
    if (why == Wake::tick && clock::now() < end) {
      sample.time = unix_now();
      sample.interval_s = std::chrono::duration<double>(clock::now() - last_tick).count();
      last_tick = clock::now();
      sample.total = *counts;
      sample.interval = *counts;
      for (size_t i = 0; i < n; ++i) sample.interval[i] -= previous[i];
      previous = *counts;
      print_sample(sample, a.json);
      continue;
    }
    if (why == Wake::target_exited) fmt::print(stderr, "pid {} exited\n", a.pid);
    sample.final = true;
    sample.time = unix_now();
    sample.interval_s = std::chrono::duration<double>(clock::now() - start).count();
    sample.total = sample.interval = *counts;
    print_sample(sample, a.json);
    break;
  }
  watch->detach();
  return exit_code;
}

}  // namespace

int verb_watch(const Args& args) {
  WatchArgs a;
  if (auto code = parse_watch(args, a)) return *code;
  return run_watch(a);
}

}  // namespace hotfix::cli
