// hotfix-ctl gc: remove what processes that are gone left behind: pinned hit counters and
// old-code probes (/sys/fs/bpf/hotfix/<pid>/) and loaded fix copies (/run/hotfix/<pid>/).
#include <fmt/core.h>

#include "cli/cli.hpp"
#include "common/audit.hpp"
#include "common/json.hpp"
#include "observe/patchcount.hpp"
#include "patch/recover.hpp"

namespace hotfix::cli {

int verb_gc(const Args& args) {
  po::options_description desc("gc options");
  desc.add_options()("dry-run,n", "only print what would be removed")("json", "print JSON");
  po::variables_map vm;
  if (auto code = parse("gc", args, desc, nullptr, vm, "[--dry-run] [--json]")) return *code;
  bool dry_run = vm.count("dry-run") > 0;
  GcReport r = patchcount__gc(dry_run);
  recover__gc(dry_run, r);  // journals of dead processes; orphans of live ones
  std::vector<std::string> notes;
  if (!dry_run) {
    AuditEntry audit;
    audit.verb = "gc";
    audit.removed = r.removed;
    if (!r.errors.empty()) audit.result = r.errors.front();
    notes = audit__record(audit);
  }
  if (vm.count("json")) {
    std::string removed, errors;
    for (auto& p : r.removed) removed += (removed.empty() ? "" : ",") + json__quote(p);
    for (auto& e : r.errors) errors += (errors.empty() ? "" : ",") + json__quote(e);
    fmt::print("{{\"dry_run\":{},\"removed\":[{}],\"errors\":[{}]{}}}\n", dry_run, removed, errors, audit_notes_json(notes));
  } else {
    print_audit_notes(notes);
    for (auto& p : r.removed) fmt::print("{} {}\n", dry_run ? "would remove" : "removed", p);
    if (r.removed.empty() && r.errors.empty()) fmt::print("nothing to remove: every pin and patch directory belongs to a live process\n");
  }
  for (auto& e : r.errors) fmt::print(stderr, "hotfix-ctl: {}\n", one_line(e));
  return r.errors.empty() ? 0 : 1;
}

}  // namespace hotfix::cli
