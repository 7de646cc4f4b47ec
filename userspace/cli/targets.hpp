// Many processes per command: --pid (repeated or a comma list), --exe, --unit and --children
// for every verb that works on processes (process/targets.hpp resolves them).
#pragma once
#include <optional>
#include <string>

#include "cli/cli.hpp"

namespace hotfix::cli {

// Declare --exe, --unit and --children in a verb's options so that its --help shows them.
// (They are consumed by run_for_targets before the verb parses anything.)
void add_target_options(po::options_description& desc);

// When `args` name anything but one single pid (several pids, --exe, --unit, --children, or
// for `list` no target at all), run `verb` once per process and print one summary; returns
// the exit code. nullopt: a single --pid (or --help): the verb runs as it always did.
std::optional<int> run_for_targets(const std::string& verb, const Args& args);

}  // namespace hotfix::cli
