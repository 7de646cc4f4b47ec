// hotfix-ctl persisted, revert --persist, and patch --persist's recording step: the patch
// sets the agent applies to every new process of a binary (agent/store.hpp).
#include <fmt/chrono.h>
#include <fmt/core.h>
#include <sys/stat.h>

#include <algorithm>
#include <ctime>
#include <filesystem>

#include "agent/agent.hpp"
#include "agent/store.hpp"
#include "cli/cli.hpp"
#include "common/json.hpp"
#include "patch/engine.hpp"

namespace hotfix::cli {

namespace {

std::string when(uint64_t ns) {
  if (!ns) return "-";
  std::time_t t = static_cast<std::time_t>(ns / 1000000000ull);
  return fmt::format("{:%Y-%m-%d %H:%M:%S}", fmt::localtime(t));
}

std::string patterns_text(const PersistedSet& s) {
  if (s.patterns.empty()) return "(all fix.so replaces)";
  std::string out;
  for (auto& p : s.patterns) out += (out.empty() ? "" : " ") + p;
  return out;
}

std::string status_of(const PersistedSet& s) {
  auto ok = persist__verify(s);
  return ok ? "ok" : ok.error().what;
}

std::string set_json(const PersistedSet& s, const std::string& status) {
  std::string patterns;
  for (auto& p : s.patterns) patterns += (patterns.empty() ? "" : ",") + json__quote(p);
  return fmt::format(
      "{{\"id\":{},\"build_id\":{},\"binary\":{},\"library\":{},\"copy\":{},\"sha256\":{},\"patterns\":[{}],"
      "\"object\":{},\"consistency\":{},\"created_ns\":{},\"ok\":{},\"status\":{}}}",
      s.id, json__quote(s.build_id), json__quote(s.binary), json__quote(s.library), json__quote(s.fix_path()),
      json__quote(s.sha256), patterns, json__quote(s.object), json__quote(s.consistency), s.created_ns,
      status == "ok" ? "true" : "false", json__quote(status));
}

}  // namespace

int verb_persisted(const Args& args) {
  po::options_description desc("persisted options");
  std::string binary;
  desc.add_options()("binary", po::value<std::string>(&binary), "only the sets of this executable")(
      "json", "print JSON");
  po::variables_map vm;
  if (auto code = parse("persisted", args, desc, nullptr, vm, "[--binary PATH] [--json]")) return *code;
  auto sets = persist__list();
  if (!sets) return report(sets.error());
  if (!binary.empty()) {
    std::string abs = std::filesystem::absolute(binary).string();
    std::erase_if(*sets, [&](const PersistedSet& s) { return s.binary != abs && s.binary != binary; });
  }
  if (vm.count("json")) {
    std::string items;
    for (auto& s : *sets) items += (items.empty() ? "" : ",") + set_json(s, status_of(s));
    fmt::print("{{\"state_dir\":{},\"sets\":[{}]}}\n", json__quote(persist__root()), items);
    return 0;
  }
  if (sets->empty()) {
    fmt::print("no persisted patch sets in {} (record one with `hotfix-ctl patch --persist`)\n", persist__dir());
    return 0;
  }
  fmt::print("{:>4}  {:<12}  {:<19}  {:<8}  {}\n", "ID", "BUILD-ID", "RECORDED", "STATUS", "BINARY / FIX / FUNCTIONS");
  for (auto& s : *sets) {
    std::string status = status_of(s);
    fmt::print("{:>4}  {:<12}  {:<19}  {:<8}  {}\n", s.id, s.build_id.substr(0, 12), when(s.created_ns),
               status == "ok" ? "ok" : "REFUSED", one_line(s.binary));
    fmt::print("{:>4}  {:<12}  {:<19}  {:<8}  fix {} (sha256 {}), {}\n", "", "", "", "", one_line(s.library),
               s.sha256.substr(0, 16), one_line(patterns_text(s)));
    if (status != "ok") fmt::print("{:>4}  {}\n", "", one_line(status));
  }
  return 0;
}

int revert_persisted(const Args& args) {
  po::options_description desc("revert --persist options");
  std::vector<uint32_t> ids;
  std::string binary;
  desc.add_options()("persist", "remove persisted patch sets (the agent stops applying them; running processes keep theirs)")(
      "id", po::value<std::vector<uint32_t>>(&ids), "the set to remove (repeatable; see `hotfix-ctl persisted`)")(
      "all", "every set of --binary")("binary", po::value<std::string>(&binary), "the executable whose sets --all removes")(
      "json", "print JSON");
  po::variables_map vm;
  const char* synopsis = "--persist (--id N... | --all --binary PATH) [--json]";
  if (auto code = parse("revert", args, desc, nullptr, vm, synopsis)) return *code;
  bool all = vm.count("all") > 0;
  if (all == !ids.empty() || (all && binary.empty()))
    return report(Error{"revert --persist needs --id N, or --all with --binary PATH",
                        fmt::format("usage: hotfix-ctl revert {}", synopsis), 2});
  if (all) {
    auto sets = persist__list();
    if (!sets) return report(sets.error());
    std::string abs = std::filesystem::absolute(binary).string();
    for (auto& s : *sets)
      if (s.binary == abs || s.binary == binary) ids.push_back(s.id);
    if (ids.empty()) return report(Error{fmt::format("no persisted patch set is for {}", binary), "see `hotfix-ctl persisted`", 1});
  }
  std::string removed;
  for (auto id : ids) {
    if (auto ok = persist__remove(id); !ok) return report(ok.error());
    removed += (removed.empty() ? "" : ",") + std::to_string(id);
    if (!vm.count("json"))
      fmt::print("removed persisted set {}: new processes run without it (running ones keep it until `hotfix-ctl revert --pid PID`)\n", id);
  }
  if (vm.count("json")) fmt::print("{{\"removed\":[{}]}}\n", removed);
  return 0;
}

}  // namespace hotfix::cli
