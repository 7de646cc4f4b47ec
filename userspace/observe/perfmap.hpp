// Names for the code hotfix places in a target, in perf's JIT map format, so `perf top`,
// `perf record`/`report` name islands and trampolines instead of showing bare addresses.
//
// perf reads /tmp/perf-PID.map for samples that fall in an *anonymous executable* mapping
// (maps shows no path) and nowhere else; every island and trampoline hotfix maps is such a
// mapping. Each line is "START SIZE name", START and SIZE in hex without 0x.
//
// The file may already belong to the target (JIT runtimes write it): only lines whose name
// starts with "hotfix " are ours; we append and remove those and never touch another line.
// The file is opened in /tmp of hotfix-ctl's own mount namespace, never through a symlink
// (O_NOFOLLOW), only as a regular file with one link, owned by root or by the target's user
// (a JIT's own map); anything else is left alone with an error (docs/safety.md). perf looks
// first in the target's mount namespace (under the pid the target has there) and then in its
// own /tmp under the global pid, so a perf run beside hotfix-ctl finds these lines unless a
// containerised target keeps its own map in its own /tmp (docs/limits.md).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

constexpr std::string_view kPerfMapOurs = "hotfix ";  // the prefix of every name we write

struct PerfMapEntry {
  uint64_t start = 0;
  uint64_t size = 0;
  std::string name;  // starts with kPerfMapOurs (added when missing); newlines become spaces
  bool operator==(const PerfMapEntry&) const = default;
};

// "/tmp/perf-PID.map".
std::string perfmap__path(pid_t pid);

// Append one line for code at [start, start+size) of `pid` (a trampoline, an island).
Result<void> perfmap__add(pid_t pid, uint64_t start, uint64_t size, const std::string& name);
// Remove our line(s) that start at `start`; nothing to do is not an error.
Result<void> perfmap__remove(pid_t pid, uint64_t start);
// Make our lines whose name starts with `owned` (e.g. "hotfix island") exactly `entries`,
// keeping every other line, ours or not, as it is. An empty result removes the file if we
// created it and nothing else is left in it.
Result<void> perfmap__sync(pid_t pid, std::string_view owned, const std::vector<PerfMapEntry>& entries);
// The process is gone: remove all our lines, and the file if we created it and it is empty.
Result<void> perfmap__forget(pid_t pid);

// Every line of the map that parses as "START SIZE name" (ours and others'); empty if none.
std::vector<PerfMapEntry> perfmap__read(pid_t pid);
// The pids that have a /tmp/perf-PID.map.
std::vector<pid_t> perfmap__pids();

}  // namespace hotfix
