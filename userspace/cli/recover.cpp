// hotfix-ctl recover: finish or undo what a killed hotfix-ctl left half done in a process
// (patch/recover.hpp). Every other verb that touches a pid does the same first.
#include <fmt/core.h>

#include "cli/cli.hpp"
#include "patch/recover.hpp"

namespace hotfix::cli {

bool recover_first(pid_t pid, bool quiet_if_busy) {
  auto lines = recover__run(pid, [](const ProgressEvent&) {}, !quiet_if_busy);
  if (!lines) {
    report(lines.error());
    return false;
  }
  for (auto& l : *lines) fmt::print(stderr, "{}\n", l);
  return true;
}

int verb_recover(const Args& args) {
  po::options_description desc("recover options");
  pid_t pid = 0;
  desc.add_options()("pid,p", po::value<pid_t>(&pid)->required(), "target process");
  po::variables_map vm;
  if (auto code = parse("recover", args, desc, nullptr, vm, "--pid PID")) return *code;
  auto lines = recover__run(pid, [](const ProgressEvent& e) { fmt::print("{}\n", e.text); }, true);
  if (!lines) return report(lines.error());
  for (auto& l : *lines) fmt::print("{}\n", l);
  if (lines->empty()) fmt::print("pid {}: nothing to recover\n", pid);
  return 0;
}

}  // namespace hotfix::cli
