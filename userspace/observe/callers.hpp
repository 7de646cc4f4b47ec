// Who calls a function: a short sampling window with a uprobe on its entry (`stats --callers`).
// Unlike the hit counters, this traps on every call while it runs (~1-12 us per call).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct CallerProbe {
  uint32_t function = 0;  // reported back in CallerStack::function
  std::string object;     // ELF object as mapped
  uint64_t offset = 0;    // file offset of the probe point: the entry, or past moved instructions
  uint64_t sp_offset = 0; // where the return address is from the stack pointer there (0 at the entry)
};

// The probe on the replacement `fn` (a function of a loaded fix copy) whose first `moved`
// bytes went to a counting trampoline (0: none): a uprobe must not sit on the trampoline's
// jump, so it goes right after the moved instructions, and reads the return address below
// what they pushed. Fails when their stack effect is not known.
Result<CallerProbe> callers__replacement_probe(pid_t pid, uint32_t function, const Function& fn, uint64_t moved);

struct CallerStack {
  uint32_t function = 0;
  uint64_t count = 0;
  // frames[0]: the return address into the caller (exact). Further frames come from the
  // user frame-pointer chain: right only where the callers keep frame pointers.
  std::vector<uint64_t> frames;
};

// Attach, sample for `window`, detach. Stacks sorted by count, most first. `attached` runs
// once the probes are in, when the window starts. Offsets the kernel refuses to probe are left
// out, each named in `skipped` ("OBJECT+0xOFF (why)").
Result<std::vector<CallerStack>> callers__sample(pid_t pid, const std::vector<CallerProbe>& probes,
                                                 std::chrono::milliseconds window,
                                                 const std::function<void()>& attached = {},
                                                 std::vector<std::string>* skipped = nullptr);

}  // namespace hotfix
