#include <fmt/core.h>

#include <algorithm>
#include <iostream>
#include <set>
#include <sstream>

#include "cli/cli.hpp"
#include "cli/describe.hpp"
#include "arch/arch.hpp"
#include "patch/fixlib.hpp"
#include "process/environment.hpp"
#include "process/memory.hpp"
#include "common/json.hpp"
#include "patch/coverage.hpp"

namespace hotfix::cli {

std::optional<int> parse(const std::string& verb, const Args& args, const po::options_description& desc,
                         const char* positional, po::variables_map& vm, const std::string& hand_synopsis) {
  // The usage line lists every option the verb accepts (cli/describe.hpp), whatever the hand
  // written part says; describe mode (--man, --complete) only records the options.
  const auto options = describe__options(desc, positional);
  const std::string synopsis = describe__synopsis(hand_synopsis, options);
  if (VerbDoc* doc = describe__capture()) {
    doc->options = options;
    doc->synopsis = synopsis;
    return 0;
  }
  po::options_description all;
  all.add(desc).add_options()("help,h", "show this help");
  po::positional_options_description pos;
  if (positional) pos.add(positional, -1);
  try {
    po::store(po::command_line_parser(args).options(all).positional(pos).run(), vm);
    if (vm.count("help")) {
      std::ostringstream text;
      text << all;
      fmt::print("usage: hotfix-ctl {} {}\n\n{}", verb, synopsis, text.str());
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fmt::print(stderr, "hotfix-ctl {}: {}; usage: hotfix-ctl {} {} (see --help)\n", verb, one_line(e.what()), verb,
               synopsis);
    return 2;
  }
  // State is keyed by host pids (see process__check_host_pid_namespace).
  static const std::set<std::string> kStateVerbs = {"patch", "revert", "recover", "list", "stats", "gc", "agent"};
  if (kStateVerbs.count(verb))
    if (auto host = process__check_host_pid_namespace(); !host) return report(host.error());
  // Every verb that takes --pid gets the same answer for a pid that names no user process
  // (a thread id, a kernel thread, ourselves, <= 0) before it reads or attaches anything.
  if (vm.count("pid")) {
    pid_t pid = 0;
    try {
      pid = vm["pid"].as<pid_t>();
    } catch (const boost::bad_any_cast&) {
      return 2;
    }
    if (auto ok = target__check_pid(pid); !ok) {
      Error e = ok.error();
      if (verb == "stats" && e.exit_code == 1 && e.what.find("kernel thread") == std::string::npos)
        e.hint = "`hotfix-ctl gc` removes what a process that is gone left behind";
      return report(e);
    }
  }
  return std::nullopt;
}

std::string one_line(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += static_cast<char>(c);
  }
  return out;
}

std::vector<ForeignBreakpoint> foreign_breakpoints(pid_t pid, const Registry& r) {
  std::vector<ForeignBreakpoint> out;
  auto mem = ProcessMemory::open(pid);
  if (!mem) return out;
  auto trap = arch::trap_instruction();
  std::set<uint64_t> seen;
  for (auto& p : r.patches) {
    if (p.state != PatchState::active) continue;
    for (auto& f : p.functions) {
      if (!seen.insert(f.old_address).second) continue;
      const PatchRecord* top = r.top_at(f.old_address);
      if (!top) continue;
      auto live = mem->read(f.old_address, trap.size());
      if (live && std::equal(trap.begin(), trap.end(), live->begin()))
        out.push_back({top->id, symbol__demangle(f.mangled), f.old_address});
    }
  }
  return out;
}

std::string foreign_breakpoint_text(pid_t pid, const ForeignBreakpoint& b) {
  return fmt::format("patched function {} (patch {}) of pid {} has a breakpoint on its entry at {:#x} where hotfix's "
                     "jump should be: another tool (bpftrace, perf probe, a debugger) put a uprobe there; while it is "
                     "attached every call runs the OLD code, and removing it will crash the process (SIGILL)",
                     b.name, b.id, pid, b.address);
}

int report(const Error& e) {
  fmt::print(stderr, "hotfix-ctl: {}\n", one_line(e.line()));
  return e.exit_code;
}

void print_audit_notes(const std::vector<std::string>& notes) {
  for (auto& n : notes) fmt::print("note: audit: {}\n", n);
  std::fflush(stdout);
}

std::string audit_notes_json(const std::vector<std::string>& notes) {
  if (notes.empty()) return "";
  std::string items;
  for (auto& n : notes) items += (items.empty() ? "" : ",") + json__quote(n);
  return ",\"audit_notes\":[" + items + "]";
}

std::string uncovered_json(const std::vector<UncoveredPlace>& places) {
  std::string out;
  for (auto& u : places)
    out += fmt::format("{}{{\"function\":{},\"kind\":\"{}\",\"in\":{},\"file\":{},\"line\":{}}}", out.empty() ? "" : ",",
                       json__quote(u.function), u.kind, json__quote(u.in),
                       u.file.empty() ? std::string("null") : json__quote(u.file),
                       u.line ? fmt::format("{}", u.line) : std::string("null"));
  return "[" + out + "]";
}

std::string uncovered_lines(const std::vector<UncoveredPlace>& places, uint64_t more, const std::string& indent) {
  std::string out;
  for (auto& u : places)
    out += fmt::format("{}uncovered: {}: {}\n", indent, one_line(coverage__describe(u)),
                       u.kind == "alias" ? "its callers get the new code too"
                                         : "those calls run the old code, neither redirected nor counted");
  if (more) out += fmt::format("{}uncovered: and {} more place(s)\n", indent, more);
  return out;
}

}  // namespace hotfix::cli
