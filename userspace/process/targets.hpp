// Which processes a command works on: pids given one by one, every process running a file,
// every process of a systemd unit, and their descendants (hotfix-ctl's --pid, --exe, --unit,
// --children). Read from /proc and cgroupfs only: no running systemd is needed.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

struct TargetSpec {
  std::vector<pid_t> pids;
  std::vector<std::string> exes;   // files; a process matches when /proc/P/exe is the same inode
  std::vector<std::string> units;  // "nginx.service" (".service" is added to a bare name)
  bool children = false;           // add every descendant of the processes above
  bool empty() const { return pids.empty() && exes.empty() && units.empty(); }
};

struct ResolvedTargets {
  std::vector<pid_t> pids;         // sorted, each once, never hotfix-ctl itself
  std::vector<std::string> notes;  // what the user should know (a replaced binary's old processes...)
};

// Every process `spec` names. An --exe or --unit that matches no process is an error (the
// user expected some), as is a file that cannot be stat()ed or a unit with no cgroup.
Result<ResolvedTargets> targets__resolve(const TargetSpec& spec);

// Processes whose /proc/P/exe is the inode of `path` (device and inode: renames and symlinks
// are the same file). A process running a binary that was replaced on disk (upgrade: new
// inode; its exe reads "PATH (deleted)") is not that file: `replaced` counts those.
Result<std::vector<pid_t>> targets__by_exe(const std::string& path, std::vector<pid_t>* replaced = nullptr);

// Processes in the cgroup directories named `unit` under /sys/fs/cgroup (any depth, with their
// sub-cgroups), from cgroup.procs.
Result<std::vector<pid_t>> targets__by_unit(const std::string& unit);

// Descendants of `pid` (children of each of its threads, /proc/P/task/T/children), recursively.
std::vector<pid_t> targets__descendants(pid_t pid);

// Every process on the host that has a hotfix registry mapped (/proc/P/maps names it).
std::vector<pid_t> targets__with_registry();

// True when `pid` still names the process that had start time `start` (0: any).
bool targets__same_process(pid_t pid, uint64_t start);

}  // namespace hotfix
