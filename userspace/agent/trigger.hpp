// The agent's kernel side (bpf/agent.bpf.c): one uprobe per armed binary, on its ELF entry
// point, that stops each new process of that file with SIGSTOP and reports it on a ring
// buffer. uprobe_multi links (perf_event_open would do too): no tracefs is needed.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/error.hpp"
#include "common/unique_fd.hpp"

namespace hotfix {

// Where a program starts: e_entry, and the file offset of that byte (what a uprobe takes).
struct EntryPoint {
  uint64_t vaddr = 0;
  uint64_t file_offset = 0;
};
Result<EntryPoint> elf__entry_point(const std::string& path);

struct EntryEvent {
  pid_t pid = 0;
  uint64_t cookie = 0;  // what arm() was given
  uint64_t ip = 0;      // the entry point's address in that process
};

class EntryTrigger {
 public:
  static Result<std::unique_ptr<EntryTrigger>> open();
  ~EntryTrigger();
  EntryTrigger(const EntryTrigger&) = delete;
  EntryTrigger& operator=(const EntryTrigger&) = delete;

  // Stop every new process of `path` at `entry` (closing the returned link disarms).
  Result<UniqueFd> arm(const std::string& path, const EntryPoint& entry, uint64_t cookie);
  // Wait up to `timeout` for events; `fn` is called for each, in order.
  Result<void> poll(std::chrono::milliseconds timeout, const std::function<void(const EntryEvent&)>& fn);
  // Events the kernel side could not report (the ring buffer was full): those processes ran on.
  uint64_t dropped() const;

 private:
  EntryTrigger() = default;
  struct State;
  State* state_ = nullptr;
};

}  // namespace hotfix
