// hotfix-ctl stats: hits on patched code, new versus old, from the patch's pinned BPF maps.
#include <fmt/chrono.h>
#include <fmt/core.h>
#include <fmt/ranges.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>

#include "cli/cli.hpp"
#include "cli/targets.hpp"
#include "cli/stop.hpp"
#include "common/json.hpp"
#include "common/unique_fd.hpp"
#include "observe/callers.hpp"
#include "observe/patchcount.hpp"
#include "patch/registry.hpp"
#include "patch/trust.hpp"
#include "process/maps.hpp"
#include "process/pidns.hpp"
#include "symbols/symbols.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis =
    "--pid PID [--id N] [--interval SEC] [--duration SEC] [--callers] [--json | --prometheus]";
constexpr const char* kNewSource = "counted where the replacement is entered (one atomic add per call, no trap)";
constexpr const char* kOldSource = "uprobe on returns of the old code (only calls still running it pay)";
constexpr const char* kCallersSource = "uprobe on the replacement's entry: traps on every call, only while sampling";

enum class Format { table, json, prometheus };

struct StatsArgs {
  pid_t pid = 0;
  std::optional<uint32_t> id;
  double interval = 0;  // 0: one shot
  double duration = 0;
  bool callers = false;
  Format format = Format::table;
};

std::optional<int> parse_stats(const Args& args, StatsArgs& out) {
  po::options_description desc("stats options");
  desc.add_options()("pid,p", po::value<pid_t>(&out.pid)->required(), "target process")(
      "id", po::value<uint32_t>(), "only this patch (default: every active patch)")(
      "interval,i", po::value<double>(&out.interval), "report every SEC seconds, with rates over the interval")(
      "duration,d", po::value<double>(&out.duration), "stop after SEC seconds; with --callers: the sampling window (default 1)")(
      "callers", "sample who calls each replacement (a uprobe on its entry, only for the window) and print the top stacks")(
      "json", "one JSON object per report")("prometheus", "Prometheus text format (node_exporter textfile collector)");
  add_target_options(desc);
  po::variables_map vm;
  if (auto code = parse("stats", args, desc, nullptr, vm, kSynopsis)) return code;
  auto usage = [](std::string what) {
    return report(Error{std::move(what), fmt::format("usage: hotfix-ctl stats {} (see --help)", kSynopsis), 2});
  };
  if (vm.count("id")) out.id = vm["id"].as<uint32_t>();
  out.callers = vm.count("callers") > 0;
  if (vm.count("json") && vm.count("prometheus")) return usage("--json and --prometheus exclude each other");
  if (vm.count("json")) out.format = Format::json;
  if (vm.count("prometheus")) out.format = Format::prometheus;
  if (vm.count("interval") && !(out.interval > 0 && std::isfinite(out.interval)))
    return usage(fmt::format("bad --interval {}: give a positive number of seconds", out.interval));
  if (!(out.duration >= 0 && std::isfinite(out.duration)))
    return usage(fmt::format("bad --duration {}: give a number of seconds >= 0", out.duration));
  if (out.callers && out.interval > 0) return usage("--callers samples once: use --duration for its window, not --interval");
  return std::nullopt;
}

double unix_now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

// One patch as a report shows it: its record and, if it is counted, its counters.
struct PatchView {
  const PatchRecord* record = nullptr;
  std::optional<PatchHits> hits;
  FunctionHits at(size_t i) const {
    return hits && i < hits->functions.size() ? hits->functions[i] : FunctionHits{};
  }
  uint64_t total() const {
    uint64_t sum = 0;
    if (hits)
      for (auto& f : hits->functions) sum += f.new_hits + f.old_hits;
    return sum;
  }
};

struct Snapshot {
  double time = 0;
  std::vector<PatchView> patches;
};

Result<std::vector<const PatchRecord*>> select_patches(const Registry& r, const StatsArgs& a) {
  std::vector<const PatchRecord*> out;
  for (auto& p : r.patches)
    if (a.id ? p.id == *a.id : p.state == PatchState::active) out.push_back(&p);
  if (a.id && out.empty()) {
    std::string ids;
    for (auto& p : r.patches) ids += fmt::format("{}{}", ids.empty() ? "" : ", ", p.id);
    return fail(fmt::format("pid {} has no patch {}", a.pid, *a.id),
                ids.empty() ? "it has no patches at all (see `hotfix-ctl list`)" : "its patches are: " + ids);
  }
  return out;
}

Result<Snapshot> take_snapshot(pid_t pid, const std::vector<const PatchRecord*>& patches) {
  Snapshot s;
  s.time = unix_now();
  for (auto* p : patches) s.patches.push_back({p, HOTFIX_TRY(patchcount__read(pid, p->id))});
  return s;
}

std::string when(uint64_t ns) {
  if (!ns) return "-";
  return fmt::format("{:%Y-%m-%d %H:%M:%S}", fmt::localtime(static_cast<std::time_t>(ns / 1000000000ull)));
}

std::string percent(uint64_t part, uint64_t whole) {
  return whole ? fmt::format("{:.2f}%", 100.0 * double(part) / double(whole)) : "-";
}

constexpr const char* kUncoveredNote =
    "calls in inlined copies and clones of a patched function run its old code: they are neither redirected nor "
    "counted, so its new share is an upper bound";

// Places (inlined copies, clones) that run `mangled`'s old code outside what is counted.
size_t unreached_places(const PatchRecord& p, const std::string& mangled) {
  std::string name = symbols__demangle(mangled);
  size_t n = 0;
  for (auto& u : p.uncovered) n += u.function == name && u.kind != "alias";
  return n;
}

// Aliases are redirected (and counted) with the function; inlined copies and clones are not.
bool any_unreached(const PatchRecord& p) {
  return p.uncovered_more || std::any_of(p.uncovered.begin(), p.uncovered.end(), [](auto& u) { return u.kind != "alias"; });
}

// The new share, never "100%" while uncounted old code runs elsewhere (marked with '*').
std::string new_share(uint64_t new_hits, uint64_t all, bool unreached) {
  std::string s = percent(new_hits, all);
  if (!unreached) return s;
  return (all && new_hits == all ? "<100%" : s) + "*";
}

// Rates: per second over the interval (between `before` and `now`), or since the patch was
// applied for a one-shot report.
struct Rates {
  double seconds = 0;
  FunctionHits delta(const PatchView& now, const PatchView* before, size_t i) const {
    FunctionHits d = now.at(i);
    if (before) {
      d.new_hits -= before->at(i).new_hits;
      d.old_hits -= before->at(i).old_hits;
    }
    return d;
  }
};

double seconds_since(uint64_t ns, double now) { return ns ? std::max(now - double(ns) / 1e9, 1e-9) : 0; }

std::string format_table_patch(pid_t pid, const PatchView& v, const PatchView* before, double now, double interval) {
  const PatchRecord& p = *v.record;
  double since = seconds_since(p.applied_ns, now);
  std::string out = fmt::format("pid {} ({}): patch {} {}, applied {} ({:.1f} s ago), {}, {} consistency\n", pid,
                                pidns__comm_label(pid), p.id, patch_state__name(p.state), when(p.applied_ns), since,
                                p.library, p.consistency);
  if (!v.hits) return out + "  no hit counters for this patch (applied without counting, or removed)\n" +
                        uncovered_lines(p.uncovered, p.uncovered_more, "  ");
  size_t width = 8;
  for (auto& f : p.functions) width = std::max(width, std::min<size_t>(symbols__demangle(f.mangled).size(), kTableNameWidth));
  double secs = interval > 0 ? interval : since;
  out += fmt::format("  {:<{}}  {:>14}  {:>14}  {:>10}  {:>10}  {:>9}  {:>8}\n", "function", width, "new-code hits",
                     "old-code hits", "new/s", "old/s", "new share", "of patch");
  uint64_t total = v.total(), sum_new = 0, sum_old = 0;
  for (size_t i = 0; i < p.functions.size(); ++i) {
    auto all = v.at(i);
    auto d = Rates{secs}.delta(v, before, i);
    std::string name = symbols__shorten(symbols__demangle(p.functions[i].mangled), width);
    out += fmt::format("  {:<{}}  {:>14}  {:>14}  {:>10.1f}  {:>10.1f}  {:>9}  {:>8}\n", name, width, all.new_hits,
                       all.old_hits, secs > 0 ? double(d.new_hits) / secs : 0.0, secs > 0 ? double(d.old_hits) / secs : 0.0,
                       new_share(all.new_hits, all.new_hits + all.old_hits, unreached_places(p, p.functions[i].mangled) > 0),
                       percent(all.new_hits + all.old_hits, total));
    sum_new += all.new_hits;
    sum_old += all.old_hits;
  }
  out += fmt::format("  {:<{}}  {:>14}  {:>14}\n", "total", width, sum_new, sum_old);
  out += fmt::format("  rates per second {}\n", interval > 0 ? fmt::format("over the last {:.1f} s", interval)
                                                            : "since the patch was applied");
  out += fmt::format("  new hits: {}\n  old hits: {}", kNewSource, kOldSource);
  out += v.hits->exit_probes ? fmt::format(", {} probe(s)\n", v.hits->exit_probes) : "; no probes: no exit of the old code lies past the entry jump\n";
  if (!p.uncovered.empty()) {
    if (any_unreached(p)) out += fmt::format("  * {}\n", kUncoveredNote);
    out += uncovered_lines(p.uncovered, p.uncovered_more, "  ");
  }
  return out;
}

std::string format_table(pid_t pid, const Snapshot& now, const Snapshot* before, double interval) {
  if (now.patches.empty()) return fmt::format("pid {} ({}) has no active patches\n", pid, pidns__comm_label(pid));
  std::string out;
  for (size_t i = 0; i < now.patches.size(); ++i)
    out += format_table_patch(pid, now.patches[i], before ? &before->patches[i] : nullptr, now.time, interval);
  return out;
}

std::string json_patch(const PatchView& v, const PatchView* before, double now, double interval,
                       const std::string& callers_json) {
  const PatchRecord& p = *v.record;
  double secs = interval > 0 ? interval : seconds_since(p.applied_ns, now);
  std::string fns;
  for (size_t i = 0; i < p.functions.size(); ++i) {
    auto all = v.at(i);
    auto d = Rates{secs}.delta(v, before, i);
    auto num = [&](uint64_t x) { return v.hits ? fmt::format("{}", x) : std::string("null"); };
    auto rate = [&](uint64_t x) { return v.hits && secs > 0 ? fmt::format("{:.3f}", double(x) / secs) : std::string("null"); };
    fns += fmt::format(R"({}{{"index":{},"name":{},"mangled":{},"old_address":"{:#x}","new_address":"{:#x}","new_hits":{},"old_hits":{},"new_per_s":{},"old_per_s":{},"unreached_places":{}}})",
                       fns.empty() ? "" : ",", i, json__quote(symbols__demangle(p.functions[i].mangled)),
                       json__quote(p.functions[i].mangled), p.functions[i].old_address, p.functions[i].new_address,
                       num(all.new_hits), num(all.old_hits), rate(d.new_hits), rate(d.old_hits),
                       unreached_places(p, p.functions[i].mangled));
  }
  return fmt::format(
      R"({{"id":{},"state":"{}","library":{},"applied_ns":{},"counted":{},"exit_probes":{},"new_hits_source":{},"old_hits_source":{},"functions":[{}],"uncovered":{},"uncovered_more":{},"uncovered_note":{}{}}})",
      p.id, patch_state__name(p.state), json__quote(p.library), p.applied_ns, v.hits.has_value(),
      v.hits ? v.hits->exit_probes : 0, json__quote(kNewSource), json__quote(kOldSource), fns,
      uncovered_json(p.uncovered), p.uncovered_more, any_unreached(p) ? json__quote(kUncoveredNote) : "null",
      callers_json);
}

std::string format_json(pid_t pid, const Snapshot& now, const Snapshot* before, double interval,
                         const std::map<uint32_t, std::string>& callers = {}) {
  std::string patches;
  for (size_t i = 0; i < now.patches.size(); ++i) {
    auto c = callers.find(now.patches[i].record->id);
    patches += (i ? "," : "") + json_patch(now.patches[i], before ? &before->patches[i] : nullptr, now.time, interval,
                                           c == callers.end() ? "" : c->second);
  }
  return fmt::format(R"({{"pid":{}{},"time":{:.3f},"interval_s":{},"patches":[{}]}})", pid,
                     pidns__json_field(pid), now.time,
                     interval > 0 ? fmt::format("{:.3f}", interval) : "null", patches);
}

// A Prometheus label value: backslash, double quote and newline escaped.
std::string label(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

std::string format_prometheus(pid_t pid, const Snapshot& now) {
  std::string out;
  auto metric = [&](const char* name, const char* type, const char* help, auto value_of) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
    for (auto& v : now.patches) {
      if (!v.hits) continue;
      for (size_t i = 0; i < v.record->functions.size(); ++i)
        out += fmt::format("{}{{pid=\"{}\",patch=\"{}\",function=\"{}\"}} {}\n", name, pid, v.record->id,
                           label(symbols__demangle(v.record->functions[i].mangled)), value_of(v, i));
    }
  };
  metric("hotfix_new_hits_total", "counter", "Calls that entered the replacement of a patched function (counted at its entry, no trap).",
         [](const PatchView& v, size_t i) { return fmt::format("{}", v.at(i).new_hits); });
  metric("hotfix_old_hits_total", "counter", "Calls that still ran the old code after the patch (uprobes on the old code's returns).",
         [](const PatchView& v, size_t i) { return fmt::format("{}", v.at(i).old_hits); });
  out += "# HELP hotfix_patch_applied_timestamp_seconds When the patch was applied (unix time).\n"
         "# TYPE hotfix_patch_applied_timestamp_seconds gauge\n";
  for (auto& v : now.patches)
    out += fmt::format("hotfix_patch_applied_timestamp_seconds{{pid=\"{}\",patch=\"{}\",library=\"{}\"}} {:.3f}\n", pid,
                       v.record->id, label(v.record->library), double(v.record->applied_ns) / 1e9);
  return out;
}

void print(const StatsArgs& a, const Snapshot& now, const Snapshot* before) {
  switch (a.format) {
    case Format::table: fmt::print("{}", format_table(a.pid, now, before, before ? now.time - before->time : 0)); break;
    case Format::json: fmt::print("{}\n", format_json(a.pid, now, before, before ? now.time - before->time : 0)); break;
    case Format::prometheus: fmt::print("{}", format_prometheus(a.pid, now)); break;
  }
  std::fflush(stdout);
}

// ---- --callers ----

std::string frame_name(const SymbolTable& table, uint64_t addr) {
  // A return address may point just past a call at the very end of its function: look up addr-1.
  const Function* f = table.function_at(addr - 1);
  if (!f) return fmt::format("{:#x}", addr);
  return fmt::format("{}+{:#x}", f->name, addr - f->address);
}

// Frames that symbolize: past the first frame, frame-pointer garbage stops the chain.
std::vector<std::string> frame_names(const SymbolTable& table, const CallerStack& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.frames.size(); ++i) {
    if (i > 0 && !table.function_at(s.frames[i] - 1)) break;
    out.push_back(frame_name(table, s.frames[i]));
  }
  return out;
}

// Stacks merged after symbolization (frame-pointer noise can split one stack into many keys).
struct NamedStack {
  std::vector<std::string> frames;
  uint64_t count = 0;
};
std::map<uint32_t, std::vector<NamedStack>> name_stacks(const SymbolTable& table, const std::vector<CallerStack>& stacks) {
  std::map<uint32_t, std::map<std::vector<std::string>, uint64_t>> merged;
  for (auto& s : stacks) merged[s.function][frame_names(table, s)] += s.count;
  std::map<uint32_t, std::vector<NamedStack>> out;
  for (auto& [fn, by_frames] : merged) {
    for (auto& [frames, count] : by_frames) out[fn].push_back({frames, count});
    std::sort(out[fn].begin(), out[fn].end(), [](auto& x, auto& y) { return x.count > y.count; });
  }
  return out;
}

// One sampling window over every selected patch; function ids are patch index << 16 | function.
Result<std::map<uint32_t, std::vector<NamedStack>>> sample_callers(pid_t pid, const std::vector<const PatchRecord*>& patches,
                                                                   const SymbolTable& table, std::chrono::milliseconds window) {
  std::vector<CallerProbe> probes;
  for (size_t p = 0; p < patches.size(); ++p)
    for (size_t i = 0; i < patches[p]->functions.size(); ++i) {
      const Function* f = table.function_at(patches[p]->functions[i].new_address);
      if (!f) return fail(fmt::format("the replacement of {} at {:#x} is in no mapped object of pid {}",
                                      symbols__demangle(patches[p]->functions[i].mangled), patches[p]->functions[i].new_address, pid));
      Function entry = *f;  // the replacement's entry (a symbol that starts there)
      entry.offset += patches[p]->functions[i].new_address - f->address, entry.address = patches[p]->functions[i].new_address;
      probes.push_back(HOTFIX_TRY(callers__replacement_probe(pid, static_cast<uint32_t>(p << 16 | i), entry,
                                                             patches[p]->functions[i].trampoline_covered)));
    }
  if (probes.empty()) return std::map<uint32_t, std::vector<NamedStack>>{};
  auto say_attached = [&] {
    // Tests and operators wait for this line before they make calls.
    fmt::print(stderr, "sampling callers of {} function(s) in pid {} for {:.1f} s ({})\n", probes.size(), pid,
               std::chrono::duration<double>(window).count(), kCallersSource);
  };
  std::vector<std::string> skipped;
  auto stacks = HOTFIX_TRY(callers__sample(pid, probes, window, say_attached, &skipped));
  if (!skipped.empty())
    fmt::print(stderr, "note: callers are not sampled at {} entr{} the kernel cannot probe: {}\n", skipped.size(),
               skipped.size() == 1 ? "y" : "ies", fmt::join(skipped, ", "));
  return name_stacks(table, std::move(stacks));
}

constexpr size_t kTopStacks = 10;

std::string callers_table(const PatchRecord& p, size_t patch_index, const std::map<uint32_t, std::vector<NamedStack>>& named,
                          double window) {
  std::string out;
  for (size_t i = 0; i < p.functions.size(); ++i) {
    auto it = named.find(static_cast<uint32_t>(patch_index << 16 | i));
    uint64_t total = 0;
    if (it != named.end())
      for (auto& s : it->second) total += s.count;
    out += fmt::format("  callers of {} ({} calls in {:.1f} s; {}):\n", symbols__demangle(p.functions[i].mangled), total,
                       window, kCallersSource);
    if (it == named.end()) continue;
    for (size_t k = 0; k < std::min(kTopStacks, it->second.size()); ++k) {
      auto& s = it->second[k];
      std::string chain;
      for (auto& f : s.frames) chain += (chain.empty() ? "" : " <- ") + f;
      out += fmt::format("    {:>10}  {:>7}  {}\n", s.count, percent(s.count, total), chain);
    }
  }
  return out;
}

std::string callers_json(const PatchRecord& p, size_t patch_index, const std::map<uint32_t, std::vector<NamedStack>>& named,
                         double window) {
  std::string fns;
  for (size_t i = 0; i < p.functions.size(); ++i) {
    std::string stacks;
    if (auto it = named.find(static_cast<uint32_t>(patch_index << 16 | i)); it != named.end())
      for (size_t k = 0; k < std::min(kTopStacks, it->second.size()); ++k) {
        std::string frames;
        for (auto& f : it->second[k].frames) frames += (frames.empty() ? "" : ",") + json__quote(f);
        stacks += fmt::format(R"({}{{"count":{},"frames":[{}]}})", stacks.empty() ? "" : ",", it->second[k].count, frames);
      }
    fns += fmt::format(R"({}{{"index":{},"name":{},"stacks":[{}]}})", fns.empty() ? "" : ",", i,
                       json__quote(symbols__demangle(p.functions[i].mangled)), stacks);
  }
  return fmt::format(R"(,"callers":{{"window_s":{:.3f},"source":{},"functions":[{}]}})", window, json__quote(kCallersSource), fns);
}

int run_callers(const StatsArgs& a, const std::vector<const PatchRecord*>& patches) {
  auto table = SymbolTable::for_pid(a.pid);
  if (!table) return report(table.error());
  double window = a.duration > 0 ? a.duration : 1.0;
  auto before = take_snapshot(a.pid, patches);
  if (!before) return report(before.error());
  auto named = sample_callers(a.pid, patches, *table, std::chrono::milliseconds(static_cast<long>(window * 1000)));
  if (!named) return report(named.error());
  auto now = take_snapshot(a.pid, patches);
  if (!now) return report(now.error());
  if (a.format == Format::json) {
    std::map<uint32_t, std::string> per_patch;
    for (size_t p = 0; p < patches.size(); ++p) per_patch[patches[p]->id] = callers_json(*patches[p], p, *named, window);
    fmt::print("{}\n", format_json(a.pid, *now, &*before, now->time - before->time, per_patch));
    return 0;
  }
  print(a, *now, &*before);
  if (a.format == Format::table)
    for (size_t p = 0; p < patches.size(); ++p) fmt::print("{}", callers_table(*patches[p], p, *named, window));
  return 0;
}

// ---- --interval ----

int run_interval(const StatsArgs& a, const std::vector<const PatchRecord*>& patches) {
  auto stop = StopSources::open(a.pid);
  if (!stop) return report(stop.error());
  auto start = std::chrono::steady_clock::now();
  auto before = take_snapshot(a.pid, patches);
  if (!before) return report(before.error());
  auto interval = std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(a.interval));
  auto end = a.duration > 0 ? start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(a.duration))
                            : std::chrono::steady_clock::time_point::max();
  for (auto next = start + interval;; next += interval) {
    Wake w = wait_until(*stop, std::min(next, end));
    if (w == Wake::target_exited) {
      fmt::print(stderr, "pid {} exited\n", a.pid);
      return 0;
    }
    auto now = take_snapshot(a.pid, patches);
    if (!now) return report(now.error());
    print(a, *now, &*before);
    if (w == Wake::signal || std::chrono::steady_clock::now() >= end) return 0;
    before = std::move(now);
  }
}

}  // namespace

int verb_stats(const Args& args) {
  if (auto code = run_for_targets("stats", args)) return *code;
  StatsArgs a;
  if (auto code = parse_stats(args, a)) return *code;
  if (auto alive = process__check_alive(a.pid); !alive)
    return report(Error{alive.error().what, "`hotfix-ctl gc` removes what a process that is gone left behind", 1});
  if (!recover_first(a.pid, true)) return 1;
  auto registry = registry__read(a.pid);
  if (!registry) return report(registry.error());
  for (auto& b : foreign_breakpoints(a.pid, *registry))  // its hits go to the old code, uncounted
    fmt::print(stderr, "hotfix-ctl: warning: {}; hint: stop that tool only after restarting the service\n",
               one_line(foreign_breakpoint_text(a.pid, b)));
  auto patches = select_patches(*registry, a);
  if (!patches) return report(patches.error());
  // Root-only pins read as "not counted" to others: say that they cannot see them instead.
  if (std::any_of(patches->begin(), patches->end(), [](auto* p) { return p->counters != 0; }))
    if (auto readable = hotfix_state__readable(a.pid, true); !readable) return report(readable.error());
  if (a.callers) {
    if (patches->empty()) return report(Error{fmt::format("pid {} has no active patches: no callers to sample", a.pid), "", 1});
    return run_callers(a, *patches);
  }
  if (a.interval > 0) return run_interval(a, *patches);
  auto now = take_snapshot(a.pid, *patches);
  if (!now) return report(now.error());
  print(a, *now, nullptr);
  return 0;
}

}  // namespace hotfix::cli
