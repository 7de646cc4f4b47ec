// Shared plumbing of the thin hotfix-ctl front end: one small file per verb.
#pragma once
#include <boost/program_options.hpp>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"

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

// Finish or undo an interrupted operation on `pid` first, saying so in one line on stderr
// (cli/recover.cpp). False (the error reported) if that failed. `quiet_if_busy`: skip
// silently while another hotfix-ctl works on it.
bool recover_first(pid_t pid, bool quiet_if_busy = false);

// Parse `args` against `desc` (positional names go to `positional`, repeated).
// On a usage error prints one line plus a hint and returns 2; on --help prints the
// help and returns 0; otherwise nullopt and `vm` is filled.
std::optional<int> parse(const std::string& verb, const Args& args, const po::options_description& desc,
                         const char* positional, po::variables_map& vm, const std::string& synopsis);

// Print `e` as one line on stderr and return its exit code.
int report(const Error& e);

}  // namespace hotfix::cli
