// hotfix-ctl: fix a bug in a running native process, and prove the fix takes the traffic.
#include <fmt/core.h>

#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <new>
#include <optional>

#include "cli/cli.hpp"
#include "cli/describe.hpp"

namespace {

struct Verb {
  int (*run)(const hotfix::cli::Args&);
  const char* summary;
};

const std::map<std::string, Verb>& verbs() {
  using namespace hotfix::cli;
  static const std::map<std::string, Verb> table = {
      {"build", {verb_build, "compile fix.so with the target's compiler and flags, stamped with its build-id"}},
      {"symbols", {verb_symbols, "list the functions of a running process that match patterns"}},
      {"watch", {verb_watch, "count calls, in-flight threads and latency of functions, live (uprobes)"}},
      {"patch", {verb_patch, "inject fix.so into a running process and jump the old functions to the new ones"}},
      {"list", {verb_list, "show the patches applied to a process"}},
      {"revert", {verb_revert, "restore the original code of one patch or of all"}},
      {"stats", {verb_stats, "hits on patched code, new versus old, from BPF maps"}},
      {"recover", {verb_recover, "finish or undo what a killed hotfix-ctl left half done in a process"}},
      {"gc", {verb_gc, "remove pinned maps and files left by processes that are gone"}},
      {"agent", {verb_agent, "daemon: apply the persisted patch sets to every new process of their binaries"}},
      {"persisted", {verb_persisted, "list the patch sets recorded with patch --persist"}},
  };
  return table;
}

void print_usage(FILE* out) {
  fmt::print(out, "usage: hotfix-ctl VERB [options]   (hotfix-ctl VERB --help for a verb's options)\n"
                  "       hotfix-ctl --version\n\nverbs:\n");
  for (auto& [name, v] : verbs()) fmt::print(out, "  {:<9} {}\n", name, v.summary);
  fmt::print(out, "\nThe manual: man hotfix-ctl\n");
}

// Hidden front-end plumbing, built from the options each verb really parses (cli/describe.hpp):
//   --man TEMPLATE   the man page: TEMPLATE with @VERBS@ replaced (build time, see docs/man)
//   --complete       the verbs, one a line (bash completion)
//   --complete VERB  its options, "--name" or "--name VALUE", one a line (a short form "-n"
//                    on the line after its long one)
std::optional<int> describe_main(const std::vector<std::string>& args) {
  using namespace hotfix::cli;
  auto doc_of = [](const std::string& name, const Verb& v) { return describe__verb(name, v.summary, v.run); };
  if (args[0] == "--complete") {
    if (args.size() == 1) {
      for (auto& [name, v] : verbs()) fmt::print("{}\n", name);
      return 0;
    }
    auto it = verbs().find(args[1]);
    if (it == verbs().end()) return 1;
    for (auto& o : doc_of(it->first, it->second).options)
      if (!o.positional) {
        std::string value = o.value.empty() ? "" : " " + o.value;
        fmt::print("--{}{}\n", o.name, value);
        if (o.short_name) fmt::print("-{}{}\n", o.short_name, value);  // right after its long form
      }
    fmt::print("--help\n");
    return 0;
  }
  if (args[0] == "--man" && args.size() == 2) {
    std::vector<VerbDoc> docs;
    for (auto& [name, v] : verbs()) docs.push_back(doc_of(name, v));
    return print_man(args[1], docs);
  }
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(stderr);
    return 2;
  }
  std::string verb = argv[1];
  if (verb == "--help" || verb == "-h" || verb == "help") {
    print_usage(stdout);
    return 0;
  }
  if (verb == "--version" || verb == "-V") return hotfix::cli::print_version();
  if (auto code = describe_main(std::vector<std::string>(argv + 1, argv + argc))) return *code;
  auto it = verbs().find(verb);
  if (it == verbs().end()) {
    std::string names;
    for (auto& [name, v] : verbs()) names += (names.empty() ? "" : ", ") + name;
    fmt::print(stderr, "hotfix-ctl: unknown verb '{}'; the verbs are: {}\n", verb, names);
    return 2;
  }
  // No exception may escape: a verb that throws (out of memory, a library's surprise) says
  // so in one line and fails, instead of dumping core in front of the operator.
  try {
    return it->second.run(hotfix::cli::Args(argv + 2, argv + argc));
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "hotfix-ctl {}: out of memory; free memory or narrow the request, then retry\n", verb);
  } catch (const std::exception& e) {
    fmt::print(stderr, "hotfix-ctl {}: internal error: {}; please report it with the command line\n", verb,
               hotfix::cli::one_line(e.what()));
  } catch (...) {
    fmt::print(stderr, "hotfix-ctl {}: internal error (unknown exception); please report it with the command line\n", verb);
  }
  return 1;
}
