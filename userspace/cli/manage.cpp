// hotfix-ctl list and revert: what was applied to a process, and taking it back.
#include <fmt/chrono.h>
#include <fmt/core.h>

#include <algorithm>
#include <ctime>

#include "cli/cli.hpp"
#include "cli/progress.hpp"
#include "cli/targets.hpp"
#include "common/audit.hpp"
#include "common/json.hpp"
#include "patch/engine.hpp"
#include "patch/deliver.hpp"
#include "patch/fixlib.hpp"
#include "process/environment.hpp"
#include "patch/trust.hpp"
#include "process/maps.hpp"
#include "process/pidns.hpp"

namespace hotfix::cli {

Result<Consistency> parse_consistency(const std::string& s);
std::string patch_functions_json(const std::vector<FunctionRecord>& functions);

namespace {

std::string state_of(const PatchRecord& p) {
  if (p.state == PatchState::active) return "active";
  return p.released ? "reverted" : "reverted (memory held)";
}

std::string when(uint64_t ns) {
  if (!ns) return "-";
  std::time_t t = static_cast<std::time_t>(ns / 1000000000ull);
  return fmt::format("{:%Y-%m-%d %H:%M:%S}", fmt::localtime(t));
}

// A patch `list` shows without --all: one that still changes or occupies the target.
bool in_target(const PatchRecord& p) { return p.state == PatchState::active || !p.released; }

void print_patch(const PatchRecord& p) {
  fmt::print("patch {}  {}  applied {}  {}  ({} consistency)\n", p.id, state_of(p), when(p.applied_ns),
             one_line(p.library), p.consistency);
  for (auto& f : p.functions)
    fmt::print("    {}  {:#x} -> {:#x}{}{}\n", symbol__demangle(f.mangled), f.old_address, f.new_address,
               f.island ? fmt::format(" (via island {:#x})", f.island) : "",
               f.trampoline ? fmt::format(" (counted by trampoline {:#x})", f.trampoline) : "");
  fmt::print("{}", uncovered_lines(p.uncovered, p.uncovered_more, "    "));
}

void print_patches(pid_t pid, const Registry& r, bool all) {
  size_t shown = 0, history = 0;
  for (auto& p : r.patches) (in_target(p) ? shown : history)++;
  if (all) shown += history;
  std::string comm = pidns__comm_label(pid);
  if (!shown) fmt::print("pid {} ({}) has no {}hotfix patches\n", pid, comm, all ? "" : "active ");
  else fmt::print("pid {} ({}): {} {}patch(es)\n", pid, comm, shown, all ? "" : "active or held ");
  for (auto& p : r.patches)
    if (all || in_target(p)) print_patch(p);
  if (all && r.pruned.count)
    fmt::print("{} older patch(es), ids {}..{}, were reverted and released; their records are summarised (last "
               "reverted {})\n",
               r.pruned.count, r.pruned.first_id, r.pruned.last_id, when(r.pruned.last_reverted_ns));
  if (!all && history + r.pruned.count)
    fmt::print("({} reverted and released patch(es) not shown: `list --all`)\n", history + r.pruned.count);
}

std::string patches_json(const Registry& r) {
  std::string out;
  for (auto& p : r.patches)
    out += fmt::format("{}{{\"id\":{},\"lib\":{},\"state\":\"{}\",\"released\":{},\"applied_ns\":{},\"reverted_ns\":{},"
                       "\"consistency\":\"{}\",\"functions\":{},\"uncovered\":{},\"uncovered_more\":{},\"sha256\":{}}}",
                       out.empty() ? "" : ",", p.id, json__quote(p.library), patch_state__name(p.state), p.released,
                       p.applied_ns, p.reverted_ns, p.consistency, patch_functions_json(p.functions),
                       uncovered_json(p.uncovered), p.uncovered_more,
                       p.sha256.empty() ? std::string("null") : json__quote(p.sha256));
  return "[" + out + "]";
}

// The kept records, plus what was summarised (only when there is any).
std::string registry_json(pid_t pid, const Registry& r) {
  std::string extra;
  if (r.pruned.count)
    extra += fmt::format(",\"pruned\":{{\"count\":{},\"first_id\":{},\"last_id\":{},\"last_reverted_ns\":{}}}",
                         r.pruned.count, r.pruned.first_id, r.pruned.last_id, r.pruned.last_reverted_ns);
  // owner: the process the record was written for; another pid's is a fork's inherited record
  // not adopted yet (patch/adopt.hpp).
  if (r.owner) extra += fmt::format(",\"owner\":{}", r.owner);
  return fmt::format("{{\"pid\":{}{},\"patches\":{}{}}}", pid, pidns__json_field(pid), patches_json(r), extra);
}

}  // namespace

int verb_list(const Args& args) {
  if (auto code = run_for_targets("list", args)) return *code;  // several processes, or every patched one
  po::options_description desc("list options");
  pid_t pid = 0;
  desc.add_options()("pid,p", po::value<pid_t>(&pid)->required(), "target process")(
      "all", "also the reverted and released patches the registry keeps, and how many it summarised")(
      "json", "print JSON (every kept record, with its state)");
  add_target_options(desc);
  po::variables_map vm;
  if (auto code = parse("list", args, desc, nullptr, vm, "--pid PID [--all] [--json]")) return *code;
  if (!recover_first(pid, true)) return 1;
  auto registry = registry__read(pid);
  if (!registry) return report(registry.error());
  if (!registry->authentic)  // shown, never acted on (revert refuses)
    fmt::print(stderr, "hotfix-ctl: warning: the hotfix registry of pid {} is not root's: {}; what follows may be forged\n",
               pid, registry->authenticity);
  if (registry->owner && registry->owner != pid)  // adoption skipped: another hotfix-ctl holds the pid
    fmt::print(stderr, "hotfix-ctl: note: pid {} shows the record it inherited from pid {} (a fork), not adopted yet "
                       "because another hotfix-ctl works on it; hint: run `hotfix-ctl list --pid {}` again\n",
               pid, registry->owner, pid);
  for (auto& b : foreign_breakpoints(pid, *registry))
    fmt::print(stderr, "hotfix-ctl: warning: {}; hint: stop that tool only after restarting the service\n",
               one_line(foreign_breakpoint_text(pid, b)));
  if (vm.count("json")) fmt::print("{}\n", registry_json(pid, *registry));
  else print_patches(pid, *registry, vm.count("all") > 0);
  return 0;
}

int verb_revert(const Args& args) {
  if (std::find(args.begin(), args.end(), "--persist") != args.end()) return revert_persisted(args);
  if (auto code = run_for_targets("revert", args)) return *code;
  po::options_description desc("revert options");
  RevertOptions opts;
  std::string consistency = "strict";
  double timeout_s = 10;
  desc.add_options()("pid,p", po::value<pid_t>(&opts.pid)->required(), "target process")(
      "id", po::value<std::vector<uint32_t>>(&opts.ids), "the patch to revert (repeatable)")(
      "all", "revert every active patch, newest first")(
      "consistency", po::value<std::string>(&consistency), "strict (default) or entry, as for patch")(
      "timeout", po::value<double>(&timeout_s), "seconds to wait for quiescence (default 10)")(
      "json", "print JSON");
  add_target_options(desc);
  po::variables_map vm;
  const char* synopsis = "--pid PID (--id N | --all) [--consistency strict|entry] [--timeout SEC] [--json]";
  if (auto code = parse("revert", args, desc, nullptr, vm, synopsis)) return *code;
  opts.all = vm.count("all");
  if (opts.all == !opts.ids.empty())
    return report(Error{"revert needs exactly one of --id N or --all", fmt::format("usage: hotfix-ctl revert {}", synopsis), 2});
  auto mode = parse_consistency(consistency);
  if (!mode) return report(mode.error());
  opts.consistency = *mode;
  opts.timeout = std::chrono::milliseconds(static_cast<long>(timeout_s * 1000));
  bool json = vm.count("json");
  if (auto holdable = target__check_holdable(opts.pid); !holdable) return report(holdable.error());
  // Missing privileges are named before recovery (which needs them too) says anything else.
  if (auto ok = process__check_privileges(false, true); !ok) return report(ok.error());
  if (!recover_first(opts.pid)) return 1;
  // The audit log gets one line per reverted patch (its library, digest and functions, from
  // the registry as it was before), or one line for a revert that failed.
  AuditEntry audit;
  audit.verb = "revert";
  audit.pid = opts.pid;
  audit.target = audit__target(opts.pid);
  auto before = registry__read(opts.pid);
  if (!before) {
    return report(before.error());
  } else {
    for (auto& b : foreign_breakpoints(opts.pid, *before))
      if (opts.all || std::find(opts.ids.begin(), opts.ids.end(), b.id) != opts.ids.end())
        return report(Error{foreign_breakpoint_text(opts.pid, b) + "; nothing was reverted",
                            "reverting under it is not safe either: restart the service, then stop the tool", 1});
  }
  ProgressPrinter printer(json);
  auto outcomes = patch__revert(opts, [&](const ProgressEvent& e) { printer(e); });
  printer.finish();
  std::vector<std::string> notes;
  if (!outcomes) {
    audit.ids = opts.ids;
    audit.result = outcomes.error().line();
    print_audit_notes(audit__record(audit));
    return report(outcomes.error());
  }
  for (auto& o : *outcomes) {
    AuditEntry one = audit;
    one.ids = {o.id};
    one.pause_us = o.pause.count() / 1000.0;
    if (const PatchRecord* p = before->find(o.id)) {
      one.library = p->library;
      one.sha256 = deliver__sha256_of(p->loaded_copy);
      for (auto& f : p->functions) one.functions.push_back(symbol__demangle(f.mangled));
    }
    for (auto& n : audit__record(one))
      if (std::find(notes.begin(), notes.end(), n) == notes.end()) notes.push_back(n);
  }
  if (outcomes->empty()) notes = audit__record(audit);  // nothing to revert: still an attempt
  if (!json) print_audit_notes(notes);
  std::string items;
  for (auto& o : *outcomes) {
    if (json) {
      items += fmt::format("{}{{\"id\":{},\"pause_us\":{:.1f},\"attempts\":{},\"released\":{},\"held_by\":{},"
                           "\"earlier\":{},\"note\":{}}}",
                           items.empty() ? "" : ",", o.id, o.pause.count() / 1000.0, o.attempts, o.released,
                           json__quote(o.held_by), o.earlier, json__quote(o.note));
      continue;
    }
    std::string memory = !o.released       ? o.held_by
                         : !o.note.empty() ? o.note
                                           : "its library is unloaded and its islands unmapped";
    if (o.earlier) fmt::print("patch {} of pid {} (reverted earlier): {}\n", o.id, opts.pid, memory);
    else
      fmt::print("reverted patch {} of pid {}: pause {:.1f} us, {} attempt(s); {}\n", o.id, opts.pid,
                 o.pause.count() / 1000.0, o.attempts, memory);
  }
  if (json) fmt::print("{{\"pid\":{},\"reverted\":[{}]{}}}\n", opts.pid, items, audit_notes_json(notes));
  else if (outcomes->empty()) fmt::print("pid {} has no active patches: nothing to revert\n", opts.pid);
  return 0;
}

}  // namespace hotfix::cli
