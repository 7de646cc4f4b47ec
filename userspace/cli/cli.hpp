// Shared plumbing of the thin hotfix-ctl front end: one small file per verb.
#pragma once
#include <boost/program_options.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "patch/registry.hpp"

namespace hotfix::cli {

namespace po = boost::program_options;

using Args = std::vector<std::string>;

// Each verb: parse its options, call the library, print. Returns the process exit code.
int verb_symbols(const Args& args);
int verb_watch(const Args& args);
int verb_patch(const Args& args);
int verb_list(const Args& args);
int verb_revert(const Args& args);
int verb_stats(const Args& args);
int verb_gc(const Args& args);
int verb_recover(const Args& args);
int verb_build(const Args& args);
int verb_agent(const Args& args);      // cli/agent.cpp
int verb_persisted(const Args& args);  // cli/persist.cpp
// `revert --persist ...`: remove persisted sets (cli/persist.cpp).
int revert_persisted(const Args& args);

// hotfix-ctl --version (cli/version.cpp).
int print_version();
// The man page: the template at `template_path` with its @VERBS@ line replaced by the verbs'
// synopses and options (cli/describe.hpp), @VERSION@ by the version (cli/version.cpp).
struct VerbDoc;
int print_man(const std::string& template_path, const std::vector<VerbDoc>& verbs);

// Finish or undo an interrupted operation on `pid` first, saying so in one line on stderr
// (cli/recover.cpp). False (the error reported) if that failed. `quiet_if_busy`: skip
// silently while another hotfix-ctl works on it.
bool recover_first(pid_t pid, bool quiet_if_busy = false);

// Parse `args` against `desc` (positional names go to `positional`, repeated).
// On a usage error prints one line plus a hint and returns 2; on --help prints the
// help and returns 0; otherwise nullopt and `vm` is filled.
std::optional<int> parse(const std::string& verb, const Args& args, const po::options_description& desc,
                         const char* positional, po::variables_map& vm, const std::string& synopsis);

// `text` with control characters escaped (\n, \t, \xNN): a path holding a newline cannot
// split a message into two lines.
std::string one_line(const std::string& text);

// Patched entries where another tool's breakpoint (int3) sits on hotfix's jump (see
// docs/safety.md: such a uprobe makes calls run the old code and crashes the process when
// it is removed). Read from /proc/PID/mem without stopping the target.
struct ForeignBreakpoint {
  uint32_t id = 0;
  std::string name;
  uint64_t address = 0;
};
std::vector<ForeignBreakpoint> foreign_breakpoints(pid_t pid, const Registry& r);
std::string foreign_breakpoint_text(pid_t pid, const ForeignBreakpoint& b);

// Print `e` as one line on stderr and return its exit code.
int report(const Error& e);

// What the audit log could not record (common/audit.hpp): "note: audit: ..." lines on stdout,
// or, for a --json result, its `,"audit_notes":[...]` member ("" when there are none).
void print_audit_notes(const std::vector<std::string>& notes);
std::string audit_notes_json(const std::vector<std::string>& notes);

// The places a patch does not cover (patch/coverage.hpp) as a JSON array of
// {"function","kind","in","file","line"} (file null and line null when unknown), and as
// table lines ("    uncovered: tax is inlined into checkout_a (shop.c:12)"), with `more`
// places the registry only counted.
std::string uncovered_json(const std::vector<UncoveredPlace>& places);
std::string uncovered_lines(const std::vector<UncoveredPlace>& places, uint64_t more, const std::string& indent);

}  // namespace hotfix::cli
