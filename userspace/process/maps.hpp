// What a target process is made of, read from /proc without stopping it.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

struct Mapping {
  uint64_t start = 0;
  uint64_t end = 0;
  uint64_t offset = 0;    // file offset of `start`
  std::string perms;      // "r-xp"
  std::string path;       // empty for anonymous mappings, "[stack]" etc. for special ones
  bool executable() const { return perms.size() > 2 && perms[2] == 'x'; }
  bool file_backed() const { return !path.empty() && path[0] == '/'; }
  bool contains(uint64_t addr) const { return addr >= start && addr < end; }
};

// The mappings of `pid` (/proc/PID/maps). Fails with a clear error if the pid does not exist.
Result<std::vector<Mapping>> process__read_maps(pid_t pid);

// The thread ids of `pid` (/proc/PID/task).
Result<std::vector<pid_t>> process__list_threads(pid_t pid);

// An error unless `pid` names a live process we may inspect.
Result<void> process__check_alive(pid_t pid);

// True while the process exists and is not a zombie.
bool process__alive(pid_t pid);

// The command name of `pid` (/proc/PID/comm), or "?".
std::string process__comm(pid_t pid);

// An error naming the missing capability unless we may use BPF, perf uprobes and ptrace.
Result<void> process__check_privileges(bool need_bpf, bool need_ptrace);

}  // namespace hotfix
