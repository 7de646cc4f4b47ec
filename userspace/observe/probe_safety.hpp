// Where a uprobe must not go. Both rules protect the target from being crashed by our probes.
//
// 1. The kernel executes a probed instruction out of line from the FILE's bytes, not the
//    process's. Where the process's entry differs from the file (a hotfix jump, another
//    patcher), a probe would run the file's instruction and resume inside the new bytes.
// 2. A return probe replaces the return address with a kernel trampoline that has no unwind
//    information: a C++ exception unwinding through a probed frame ends in std::terminate.
#pragma once
#include <sys/types.h>

#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

// An error naming the first function whose entry in `pid` no longer matches its file.
Result<void> probe__check_entries(pid_t pid, const std::vector<Function>& functions);

// Objects among `functions` that hold C++ exception tables (.gcc_except_table): an exception
// may unwind through their frames, so return probes there are unsafe.
std::vector<std::string> probe__objects_with_exceptions(const std::vector<Function>& functions);

}  // namespace hotfix
