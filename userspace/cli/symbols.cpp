// hotfix-ctl symbols: list the functions of a running process that match patterns.
#include <fmt/core.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <set>

#include "cli/cli.hpp"
#include "common/json.hpp"
#include "process/maps.hpp"
#include "symbols/pattern.hpp"

namespace hotfix::cli {

namespace {

constexpr const char* kSynopsis = "--pid PID [PATTERN...] [--object NAME] [--json | --wide | --names-only]";

constexpr const char* kOutput =
    "\noutput: a table (ADDRESS OFFSET SIZE BIND OBJECT NAME MANGLED), one function per line in\n"
    "address order; OFFSET is the file offset uprobes attach to. With --json, one JSON array of\n"
    "objects {\"name\",\"mangled\",\"aliases\",\"object\",\"address\",\"offset\",\"size\",\"binding\",\n"
    "\"exported\",\"ifunc\",\"resolver\"} (numbers are decimal; an IFUNC's address is the implementation\n"
    "this process uses, resolver the IFUNC symbol's own). Names are demangled (C++, Rust without its\n"
    "hash); the table fits each line to the terminal's width (or $COLUMNS), cutting names with \u2026, and\n"
    "without either cuts names at 60 columns; --wide and --json do not cut. --names-only prints each\n"
    "name once a line (for shell completion). Patterns: exact names\n"
    "(`Order::total`, a mangled name, `Order::add(int)` for one overload, a Rust path\n"
    "`main::pricing::discount`) and globs (`pricing::*`, `*parse*`). Separate debug\n"
    "files are found by build-id and .gnu_debuglink under $HOTFIX_DEBUG_ROOT (default /usr/lib/debug).\n";

std::string basename_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// The columns a table line may take: the terminal's, else $COLUMNS, else 0 (no limit: each
// name is cut at kTableNameWidth instead, so a pipe still gets lines a person can read).
size_t output_columns() {
  struct winsize ws {};
  if (::isatty(STDOUT_FILENO) && ::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  if (const char* c = std::getenv("COLUMNS"); c && *c) {
    long n = std::strtol(c, nullptr, 10);
    if (n > 0) return static_cast<size_t>(n);
  }
  return 0;
}

void print_table(const std::vector<Function>& functions, bool wide) {
  size_t columns = wide ? 0 : output_columns();
  size_t object_w = 6, longest = 4;
  for (auto& f : functions) {
    object_w = std::max(object_w, basename_of(f.object).size());
    longest = std::max(longest, f.name.size());
  }
  // ADDRESS..OBJECT take a fixed width; NAME gets at most half of what is left (MANGLED the
  // rest), and every line is cut at the terminal's edge.
  constexpr size_t kFixed = 18 + 2 + 10 + 2 + 7 + 2 + 6 + 2;
  size_t name_limit = wide ? longest : kTableNameWidth;
  if (columns) name_limit = std::max<size_t>(12, (columns > kFixed + object_w + 4 ? columns - kFixed - object_w - 4 : 0) / 2);
  size_t name_w = std::min(longest, name_limit);
  auto fit = [&](const std::string& s) { return wide ? s : symbols__shorten(s, columns ? name_w : kTableNameWidth); };
  auto line = [&](const std::string& text) { fmt::print("{}\n", columns ? symbols__shorten(text, columns) : text); };
  line(fmt::format("{:<18}  {:>10}  {:>7}  {:<6}  {:<{}}  {:<{}}  {}", "ADDRESS", "OFFSET", "SIZE", "BIND", "OBJECT",
                   object_w, "NAME", name_w, "MANGLED"));
  for (auto& f : functions)
    line(fmt::format("{:#018x}  {:#10x}  {:>7}  {:<6}  {:<{}}  {:<{}}  {}{}", f.address, f.offset, f.size,
                     binding__name(f.binding), basename_of(f.object), object_w, fit(f.name), name_w, fit(f.mangled),
                     f.resolver ? fmt::format("  (IFUNC, resolver {:#x})", f.resolver) : ""));
}

void print_names(const std::vector<Function>& functions) {
  std::set<std::string> seen;
  for (auto& f : functions)
    if (seen.insert(f.name).second) fmt::print("{}\n", f.name);
}

void print_json(const std::vector<Function>& functions) {
  fmt::print("[");
  for (size_t i = 0; i < functions.size(); i++) {
    auto& f = functions[i];
    std::string aliases;
    for (auto& a : f.aliases) aliases += (aliases.empty() ? "" : ",") + json__quote(a);
    fmt::print("{}\n{{\"name\":{},\"mangled\":{},\"aliases\":[{}],\"object\":{},\"address\":{},\"offset\":{},"
               "\"size\":{},\"binding\":\"{}\",\"exported\":{},\"ifunc\":{},\"resolver\":{}}}",
               i ? "," : "", json__quote(f.name), json__quote(f.mangled), aliases, json__quote(f.object), f.address,
               f.offset, f.size, binding__name(f.binding), f.exported, f.ifunc,
               f.resolver ? std::to_string(f.resolver) : "null");
  }
  fmt::print("\n]\n");
}

// Reading another user's process needs CAP_SYS_PTRACE; our own needs nothing.
Result<void> check_access(pid_t pid) {
  HOTFIX_CHECK(process__check_alive(pid));
  struct stat st;
  bool ours = ::stat(fmt::format("/proc/{}", pid).c_str(), &st) == 0 && st.st_uid == ::geteuid();
  return ours ? Result<void>{} : process__check_privileges(false, true);
}

}  // namespace

int verb_symbols(const Args& args) {
  po::options_description desc("options");
  desc.add_options()
      ("pid,p", po::value<int>()->required(), "process whose functions to list")
      ("pattern", po::value<std::vector<std::string>>(), "names or globs (default: every function)")
      ("object", po::value<std::string>(), "only functions of this object: basename (libfoo.so, libfoo.so.1) or path")
      ("json", "one JSON array instead of a table")
      ("wide", "names in full (the table cuts names at the terminal's width, or at 60 columns, with \u2026)")
      ("names-only", "only the names, each once a line (for shell completion)");
  po::variables_map vm;
  if (auto code = parse("symbols", args, desc, "pattern", vm, kSynopsis)) {
    if (*code == 0) fmt::print("{}", kOutput);
    return *code;
  }
  pid_t pid = vm["pid"].as<int>();
  if (auto ok = check_access(pid); !ok) return report(ok.error());
  auto table = SymbolTable::for_pid(pid);
  if (!table) return report(table.error());

  SelectOptions opts;
  if (vm.count("object")) opts.object = vm["object"].as<std::string>();
  auto patterns = vm.count("pattern") ? vm["pattern"].as<std::vector<std::string>>() : std::vector<std::string>{"*"};
  auto selected = symbols__select(*table, patterns, opts);
  if (!selected) return report(selected.error());

  if (vm.count("json")) print_json(*selected);
  else if (vm.count("names-only")) print_names(*selected);
  else print_table(*selected, vm.count("wide") > 0);
  return 0;
}

}  // namespace hotfix::cli
