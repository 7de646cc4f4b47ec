// Reading and writing another process's memory. /proc/PID/mem is the path that also
// writes read-only text (the kernel uses FOLL_FORCE for it, as for a debugger's breakpoints);
// process_vm_readv is the cheaper path for bulk reads that may stop at an unmapped page.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/unique_fd.hpp"

namespace hotfix {

class ProcessMemory {
 public:
  // Opens /proc/PID/mem read-write. Needs ptrace access to `pid` (root, or our tracee).
  static Result<ProcessMemory> open(pid_t pid);

  pid_t pid() const { return pid_; }
  // Exactly `out.size()` bytes at `addr`, one pread; an error if any byte is unmapped.
  Result<void> read(uint64_t addr, std::span<uint8_t> out) const;
  Result<std::vector<uint8_t>> read(uint64_t addr, size_t len) const;
  // Exactly `bytes` at `addr`, one pwrite; works on read-only (text) pages too.
  Result<void> write(uint64_t addr, std::span<const uint8_t> bytes) const;
  // A NUL-terminated string at `addr`, at most `max` bytes (read page by page).
  Result<std::string> read_string(uint64_t addr, size_t max = 4096) const;
  // Up to `out.size()` bytes at `addr` with process_vm_readv; returns how many were read
  // (stops early at an unmapped page; 0 if the first byte is unmapped).
  size_t read_bulk(uint64_t addr, std::span<uint8_t> out) const;

 private:
  ProcessMemory(pid_t pid, UniqueFd fd) : pid_(pid), fd_(std::move(fd)) {}
  pid_t pid_ = 0;
  UniqueFd fd_;
};

}  // namespace hotfix
