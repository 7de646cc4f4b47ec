// hotfix-ctl build: compile a fix with the target's compiler and flags, stamped for its build.
#include <fmt/core.h>

#include <algorithm>

#include "cli/cli.hpp"
#include "common/json.hpp"
#include "patch/build.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis =
    "(--pid PID [--object NAME] | --binary PATH) -o fix.so SOURCES... [--dry-run] [--json] [--compiler CC] "
    "[-- EXTRA COMPILER ARGS]";

constexpr const char* kOutput =
    "\nThe flags come from the target object's DW_AT_producer (its DWARF, or its separate debug file):\n"
    "language standard, -O, -m*, -f*, --param and defines; position, LTO, profile and path options are\n"
    "dropped; -shared -fPIC -g are added; EXTRA COMPILER ARGS come last. The target's build-id is written\n"
    "into fix.so as an ELF note (.note.hotfix.target) that `patch` checks. --dry-run prints the command\n"
    "(its stamp source stays in /tmp/hotfix-build-*/ for it); --json prints {object, build_id, producer,\n"
    "compiler, flags, dropped, stamp_source, command, notes}.\n";

std::string strings_json(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ",") + json__quote(s);
  return "[" + out + "]";
}

void print_json(const BuildPlan& plan, bool dry_run) {
  std::string dropped;
  for (auto& [flag, why] : plan.flags.dropped)
    dropped += fmt::format("{}{{\"flag\":{},\"why\":{}}}", dropped.empty() ? "" : ",", json__quote(flag), json__quote(why));
  fmt::print("{{\"dry_run\":{},\"object\":{},\"build_id\":{},\"producer\":{},\"language\":\"{}\",\"compiler\":{},"
             "\"flags\":{},\"dropped\":[{}],\"stamp_source\":{},\"output\":{},\"command\":{},\"notes\":{}}}\n",
             dry_run, json__quote(plan.object), json__quote(plan.build_id), json__quote(plan.producer),
             source_language__name(plan.language), json__quote(plan.compiler), strings_json(plan.flags.kept), dropped,
             json__quote(plan.stamp_source), json__quote(plan.output), strings_json(plan.command),
             strings_json(plan.notes));
}

void print_text(const BuildPlan& plan) {
  for (auto& n : plan.notes) fmt::print("note: {}\n", n);
  fmt::print("target: {} (build-id {})\n", plan.object, plan.build_id.empty() ? "none" : plan.build_id);
  fmt::print("flags from: {}\n", plan.producer.empty() ? "(no producer: plain defaults)" : plan.producer);
  for (auto& [flag, why] : plan.flags.dropped) fmt::print("  dropped {}: {}\n", flag, why);
}

}  // namespace

int verb_build(const Args& all_args) {
  // Everything after `--` goes to the compiler untouched.
  auto dashes = std::find(all_args.begin(), all_args.end(), "--");
  Args args(all_args.begin(), dashes);
  BuildOptions opts;
  if (dashes != all_args.end()) opts.extra.assign(dashes + 1, all_args.end());

  po::options_description desc("build options");
  desc.add_options()("pid,p", po::value<pid_t>(&opts.pid), "the fix is for an object of this running process")(
      "object", po::value<std::string>(&opts.object), "that object (basename or path; default: the executable)")(
      "binary", po::value<std::string>(&opts.binary), "the fix is for this ELF file instead")(
      "output,o", po::value<std::string>(&opts.output)->required(), "the fix library to write (fix.so)")(
      "source", po::value<std::vector<std::string>>(&opts.sources), "the fix's sources (.c: C, .cpp/.cc/.cxx: C++)")(
      "compiler", po::value<std::string>(&opts.compiler), "compile with this instead of the compiler the producer names")(
      "stamp-source", po::value<std::string>(&opts.stamp_source), "write the generated stamp source here (default: a temporary directory)")(
      "flags-file", po::value<std::string>(), "also write the chosen flags as a response file (cc @FILE), for build systems")(
      "dry-run", "print the command and stop")("json", "print the plan as JSON");
  po::variables_map vm;
  if (auto code = parse("build", args, desc, "source", vm, kSynopsis)) {
    if (*code == 0) fmt::print("{}", kOutput);
    return *code;
  }
  bool json = vm.count("json") > 0, dry_run = vm.count("dry-run") > 0;
  if (!opts.object.empty() && opts.pid == 0) return report(Error{"--object needs --pid", "", 2});
  auto plan = build__plan(opts);
  if (!plan) return report(plan.error());
  if (vm.count("flags-file"))
    if (auto written = build__write_flags_file(*plan, vm["flags-file"].as<std::string>()); !written)
      return report(written.error());
  if (json) print_json(*plan, dry_run);
  else print_text(*plan);
  if (dry_run) {
    if (!json) fmt::print("{}\ndry run: nothing was compiled\n", build__command_line(*plan));
    return 0;
  }
  if (!json) fmt::print("{}\n", build__command_line(*plan));
  std::fflush(stdout);
  if (auto built = build__run(*plan); !built) return report(built.error());
  if (!json)
    fmt::print("built {}{}\n", opts.output,
               plan->build_id.empty() ? " (not stamped)" : fmt::format(", stamped for build-id {}", plan->build_id));
  return 0;
}

}  // namespace hotfix::cli
