// hotfix-ctl patch: print the plan, then apply it (or stop there with --dry-run).
#include <fmt/core.h>

#include "cli/cli.hpp"
#include "cli/targets.hpp"
#include "process/maps.hpp"
#include "cli/progress.hpp"
#include "common/audit.hpp"
#include "common/json.hpp"
#include "common/sha256.hpp"
#include "observe/inside.hpp"
#include "patch/engine.hpp"
#include "process/environment.hpp"
#include "agent/agent.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis =
    "--pid PID --lib fix.so [PATTERN...] [--object NAME] [--consistency strict|entry] [--timeout SEC] "
    "[--allow-untrusted-lib] [--allow-uncovered] [--persist] [--dry-run] [--json]";

std::string hex(const std::vector<uint8_t>& bytes) {
  std::string s;
  for (auto b : bytes) s += fmt::format("{}{:02x}", s.empty() ? "" : " ", b);
  return s;
}

void print_plan(const PreparedPatch& p) {
  fmt::print("plan: patch {} for pid {} from {} ({} consistency), {} function(s)\n", p.id, p.options.pid,
             p.options.library, consistency__name(p.options.consistency), p.switches.size());
  for (auto& s : p.switches) {
    const Function& fn = s.entry.target;
    fmt::print("  {}  {:#x} -> {}+{:#x}\n", fn.name, fn.address, p.options.library, s.entry.replacement_value);
    fmt::print("      overwrites {} ({}){}; writes a {}-byte jmp\n", hex(s.current), s.check.disasm,
               s.stacked_on ? fmt::format(", the jump of patch {}", s.stacked_on->id) : "", arch::entry_jump_size());
  }
  for (auto& n : p.notes) fmt::print("  {}: {}\n", n.check, n.text);
}

std::string notes_json(const std::vector<PlanNote>& notes) {
  std::string out;
  for (auto& n : notes)
    out += fmt::format("{}{{\"check\":{},\"text\":{}}}", out.empty() ? "" : ",", json__quote(n.check), json__quote(n.text));
  return "[" + out + "]";
}

void print_liveness(const ObservedWindow& w) {
  std::string by = !w.uprobes ? "trampolines"
                   : !w.trampolines ? "uprobes"
                                    : fmt::format("trampolines: {}, uprobes: {}", w.trampolines, w.uprobes);
  fmt::print("observed for {:.2f} s ({}):\n", w.seconds, by);
  for (auto& f : w.functions)
    fmt::print("  {:<50} {:>10.1f} calls/s  {:<5} {}\n", f.name, f.calls_per_s, f.calls_per_s > 0 || f.inflight > 0 ? "live" : "idle",
               f.inflight < 0 ? std::string("threads inside: n/a (the threads could not be looked at)")
                              : "threads inside: " + inside__describe(InsideCount{f.inflight, f.inflight, f.inside_unknown}));
}

std::string functions_json(const std::vector<FunctionRecord>& functions) {
  std::string out;
  for (auto& f : functions)
    out += fmt::format("{}{{\"name\":{},\"mangled\":{},\"old\":\"{:#x}\",\"new\":\"{:#x}\"}}", out.empty() ? "" : ",",
                       json__quote(symbol__demangle(f.mangled)), json__quote(f.mangled), f.old_address,
                       f.new_address);
  return "[" + out + "]";
}

}  // namespace

Result<Consistency> parse_consistency(const std::string& s) {
  if (s == "strict") return Consistency::strict;
  if (s == "entry") return Consistency::entry;
  return usage_error(fmt::format("--consistency must be 'strict' or 'entry', not '{}'", s));
}

std::string patch_functions_json(const std::vector<FunctionRecord>& functions) { return functions_json(functions); }

int verb_patch(const Args& args) {
  if (auto code = run_for_targets("patch", args)) return *code;  // --exe, --unit, several pids
  po::options_description desc("patch options");
  PatchOptions opts;
  std::string consistency = "strict";
  double timeout_s = 10, observe_s = 1;
  std::string count_mode = "trampoline";
  desc.add_options()("pid,p", po::value<pid_t>(&opts.pid)->required(), "target process")(
      "lib,l", po::value<std::string>(&opts.library)->required(), "the fix library (fix.so)")(
      "pattern", po::value<std::vector<std::string>>(&opts.patterns), "functions to replace (default: all fix.so replaces)")(
      "object", po::value<std::string>(&opts.object), "only functions of this mapped object")(
      "consistency", po::value<std::string>(&consistency), "strict (default): no thread may have an old function on its stack; entry: only not inside the overwritten bytes")(
      "timeout", po::value<double>(&timeout_s), "seconds to wait for quiescence, and for loading fix.so (its constructors included) (default 10)")(
      "no-abi-check", "do not refuse replacements that change registers the original preserves (-fipa-ra callers)")(
      "no-count", "do not count hits (no counting island, no probes on the old code's exits)")(
      "observe", po::value<double>(&observe_s), "seconds to watch the functions' liveness before acting (default: adaptive, 0.1 s, up to 1 s while counts are too few to judge; 0 to skip; a dry run only observes when this is given)")(
      "max-overhead", po::value<double>(&opts.max_overhead_pct), "observe window's probe budget, % of one CPU (default 2): the hottest functions' probes are cut above it")(
      "count", po::value<std::string>(&count_mode), "how the observe window counts calls: trampoline (no trap, the default; uprobes only where a prologue cannot move) or uprobe")(
      "blind-retry", "strict mode: retry the stop on a timer instead of waiting for the uprobes to see no thread inside")(
      "allow-untrusted-lib", "load fix.so even if someone besides root and you could have changed it (recorded in the audit log)")(
      "allow-uncovered", "apply even where inlined copies, clones or aliases of a patched function run its code outside the entry jump (they are listed in the plan, list and stats)")(
      "persist", "also record the set in the state directory (/var/lib/hotfix) for `hotfix-ctl agent` to apply to every new process of this executable")(
      "dry-run", "check everything apply checks (binding fix.so's symbols included), print the plan and stop")("json", "print the result as JSON");
  add_target_options(desc);
  po::variables_map vm;
  if (auto code = parse("patch", args, desc, "pattern", vm, kSynopsis)) return *code;
  auto mode = parse_consistency(consistency);
  if (!mode) return report(mode.error());
  if (timeout_s <= 0) return report(Error{"--timeout must be positive", "", 2});
  opts.consistency = *mode;
  opts.timeout = std::chrono::milliseconds(static_cast<long>(timeout_s * 1000));
  bool json = vm.count("json");
  opts.abi_check = !vm.count("no-abi-check");
  opts.count = !vm.count("no-count");
  opts.quiesce_probes = !vm.count("blind-retry");
  if (observe_s < 0) return report(Error{"--observe must be 0 or more seconds", "", 2});
  opts.observe = std::chrono::milliseconds(static_cast<long>(observe_s * 1000));
  opts.observe_adaptive = !vm.count("observe");  // a window given is a window kept
  if (count_mode != "trampoline" && count_mode != "uprobe")
    return report(Error{fmt::format("bad --count {}: give trampoline or uprobe", count_mode), "", 2});
  opts.observe_trampolines = count_mode == "trampoline";
  if (!(opts.max_overhead_pct > 0)) return report(Error{"--max-overhead must be a share of one CPU in percent, > 0", "", 2});
  opts.allow_untrusted_lib = vm.count("allow-untrusted-lib") > 0;
  opts.allow_uncovered = vm.count("allow-uncovered") > 0;
  bool dry_run = vm.count("dry-run") > 0;

  // Every attempt that gets past the options is audited, refusals included (not dry runs).
  AuditEntry audit;
  audit.verb = "patch";
  audit.pid = opts.pid;
  audit.target = audit__target(opts.pid);
  audit.library = opts.library;
  audit.allow_untrusted_lib = opts.allow_untrusted_lib;
  auto refused = [&](const Error& e) {
    if (!dry_run) {
      audit.result = e.line();
      print_audit_notes(audit__record(audit));
    }
    return report(e);
  };

  if (auto holdable = target__check_holdable(opts.pid); !holdable) return report(holdable.error());
  // Missing privileges are named before recovery (which needs them too) says anything else.
  if (auto ok = process__check_privileges(false, true); !ok) return report(ok.error());
  if (!recover_first(opts.pid)) return 1;
  auto prepared = patch__prepare(opts);
  if (!prepared) return refused(prepared.error());
  audit.sha256 = sha256__hex(prepared->fix.bytes);
  audit.ids = {prepared->id};
  audit.untrusted = prepared->untrusted;
  audit.uncovered = prepared->uncovered.size();
  for (auto& s : prepared->switches) audit.functions.push_back(s.entry.target.name);
  std::optional<PersistedSet> persist;  // checked before anything changes, recorded after
  if (vm.count("persist")) {
    auto planned = persist__plan(*prepared);
    if (!planned) return refused(planned.error());
    persist = std::move(*planned);
  }
  if (!prepared->untrusted.empty() && !json)
    fmt::print("note: loading an untrusted fix library (--allow-untrusted-lib): {}\n", prepared->untrusted);
  if (!json) print_plan(*prepared);
  // A dry run observes only when asked to (--observe SEC): its answer is the plan, and the
  // default window would make every dry run slower.
  if (opts.observe.count() > 0 && (!dry_run || vm.count("observe"))) {
    auto observed = patch__observe_window(*prepared);
    if (!observed) return refused(observed.error());
    if (!json) {
      for (auto& note : observed->notes) fmt::print("note: {}\n", note);
      print_liveness(*observed);
    }
  }
  if (dry_run) {
    if (json)
      fmt::print("{{\"id\":null,\"dry_run\":true,\"functions\":{},\"notes\":{},\"uncovered\":{}}}\n",
                 prepared->switches.size(), notes_json(prepared->notes), uncovered_json(prepared->uncovered));
    else fmt::print("dry run: nothing was changed\n");
    return 0;
  }
  ProgressPrinter printer(json);
  auto outcome = patch__apply(*prepared, [&](const ProgressEvent& e) { printer(e); });
  printer.finish();
  if (!outcome) return refused(outcome.error());
  audit.ids = {outcome->id};
  audit.loaded_sha256 = outcome->loaded_sha256;
  audit.pause_us = outcome->pause.count() / 1000.0;
  auto notes = audit__record(audit);
  std::string persisted_json;
  if (persist) {
    auto recorded = persist__record(*persist, prepared->fix.bytes);
    if (!recorded) {
      report(Error{fmt::format("applied patch {} to pid {}, but could not persist it: {}", outcome->id, opts.pid,
                               recorded.error().what), recorded.error().hint});
      return 1;
    }
    persist = *recorded;
    persisted_json = fmt::format(",\"persisted\":{{\"set\":{},\"copy\":{},\"existing\":{}}}", persist->id,
                                 json__quote(persist->fix_path()), persist->existing);
  }
  if (json) {
    fmt::print("{{\"id\":{},\"pause_us\":{:.1f},\"attempts\":{},\"sha256\":\"{}\",\"functions\":{},\"notes\":{},"
               "\"uncovered\":{}{}}}\n",
               outcome->id, outcome->pause.count() / 1000.0, outcome->attempts, outcome->sha256,
               functions_json(outcome->functions), notes_json(prepared->notes), uncovered_json(prepared->uncovered),
               persisted_json + audit_notes_json(notes));
  } else {
    print_audit_notes(notes);
    fmt::print("applied patch {} to pid {}: {} function(s), pause {:.1f} us, {} attempt(s)\n", outcome->id,
               opts.pid, outcome->functions.size(), outcome->pause.count() / 1000.0, outcome->attempts);
    if (persist)
      fmt::print("{} as set {} for {} (build-id {}): `hotfix-ctl agent` applies it to every new process\n",
                 persist->existing ? "already persisted" : "persisted", persist->id, persist->binary,
                 persist->build_id.substr(0, 12));
    if (!prepared->uncovered.empty())
      fmt::print("{} place(s) not covered (--allow-uncovered):\n{}", prepared->uncovered.size(),
                 uncovered_lines(prepared->uncovered, 0, "  "));
  }
  return 0;
}

}  // namespace hotfix::cli
