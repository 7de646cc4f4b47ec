// Live call counts of functions in a running process, from uprobes (BPF).
// One Watch = one loaded `watch` BPF program pair + its attachments; destroying it detaches
// everything (links are file descriptors, so a killed hotfix-ctl leaves nothing behind either).
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

struct watch_bpf;

namespace hotfix {

enum class ProbeMechanism {
  automatic,     // uprobe_multi when the kernel has it, else perf uprobes
  uprobe_multi,  // one link per (object, entry/return): fast to attach and detach
  perf,          // one perf-event uprobe per function and direction: ~0.1 s each to detach
};
const char* probe_mechanism__name(ProbeMechanism m);

struct WatchOptions {
  // Return probes: needed for in-flight counts and latency; they cost more per call. Go
  // functions never get them, whatever this says (observe/probe_safety.hpp).
  bool returns = true;
  // automatic: uprobe_multi unless this kernel has none (asked once with a known-good probe);
  // it also honours HOTFIX_FORCE_PERF_UPROBES=1 (to exercise the fallback).
  ProbeMechanism mechanism = ProbeMechanism::automatic;
  // One line of progress, once attaching or detaching has taken a second and then about once a
  // second ("attaching: 8192 of 40622 probes, 1.0 s"). hotfix-ctl watch prints them on stderr.
  std::function<void(const std::string&)> progress = nullptr;
};

// Whether a watched function has a return probe (in-flight and latency), and if not, why.
enum class ReturnProbes {
  on,
  off,  // not asked for (WatchOptions::returns, or the caller's C++-exception rule)
  go,   // Go code: never (a return probe kills a Go program)
  budget,  // dropped by the overhead budget (observe/budget.hpp): calls are still counted
};

// What Watch::reduce does to one function's probes (the budget's decision, observe/budget.hpp).
enum class ProbeCut {
  keep,
  drop_return,  // detach the return probe, keep counting calls with the entry probe
  drop,         // detach both: the function's counts stop where they are
};

// A function the kernel refused to probe (e.g. its first instruction is `lock`-prefixed): left
// out of the watch, which goes on with the others.
struct SkippedFunction {
  Function function;
  int err = 0;
  std::string reason;  // for people: "the kernel cannot probe its first instruction (ENOTSUPP)"
};

struct CallCounts {
  uint64_t calls = 0;            // entries since attach
  uint64_t returns = 0;          // returns of calls that entered since attach
  uint64_t latency_ns = 0;       // summed over timed (outermost) calls
  uint64_t latency_samples = 0;
  uint64_t untracked = 0;        // entries the in-flight table had no room for
  // Threads inside the function now. A thread that was already inside when the watch
  // attached is not counted: its return probe was never installed either.
  int64_t inflight() const {
    return static_cast<int64_t>(calls) - static_cast<int64_t>(returns) - static_cast<int64_t>(untracked);
  }
  double mean_latency_ns() const { return latency_samples ? double(latency_ns) / double(latency_samples) : 0.0; }
  CallCounts& operator-=(const CallCounts& o);
};

class Watch {
 public:
  // Load the BPF programs and attach an entry (and return) uprobe to every function of
  // `functions` (object path + file offset), counting only calls made by `pid`. Functions the
  // kernel refuses to probe are left out: functions() holds those attached, skipped() the others.
  static Result<Watch> attach(pid_t pid, std::vector<Function> functions, const WatchOptions& opts = {});

  Watch(Watch&&) noexcept;
  Watch& operator=(Watch&&) noexcept;
  ~Watch();

  // Counters per function, in the order of functions(), summed over CPUs.
  Result<std::vector<CallCounts>> read() const;
  // Calls of functions()[i] by thread `tid` that the probes saw enter and not return yet
  // (the in-flight table; recursion counts each). 0 without return probes.
  uint64_t tracked_frames(pid_t tid, size_t i) const;
  // Remove every probe now (the destructor does it too).
  void detach();
  // Cut probes back, per function of functions() (`cuts` in that order): the links of the
  // objects concerned are replaced by links without the cut probes (their other functions go
  // on counting in the same slots; calls made during the swap, a few ms, are not counted).
  // A dropped function stays in functions() with its counts frozen (observed(i) is false).
  Result<void> reduce(const std::vector<ProbeCut>& cuts);
  bool observed(size_t i) const { return observed_[i]; }

  const std::vector<Function>& functions() const { return functions_; }
  const std::vector<SkippedFunction>& skipped() const { return skipped_; }
  ProbeMechanism mechanism() const { return mechanism_; }
  bool returns() const { return returns_; }  // some function has return probes
  ReturnProbes return_probes(size_t i) const { return return_probes_[i]; }  // of functions()[i]
  size_t input_index(size_t i) const { return slots_[i]; }  // functions()[i]'s index in attach's `functions`
  pid_t pid() const { return pid_; }
  size_t link_count() const;
  double attach_ms() const { return attach_ms_; }  // load + attach, wall time

  struct Links;  // the kernel links (internal to watch.cpp)

 private:
  Watch() = default;
  pid_t pid_ = 0;
  std::vector<Function> functions_;
  std::vector<ReturnProbes> return_probes_;  // by functions_ index
  std::vector<uint32_t> slots_;              // functions_ index -> counter slot (the probe's cookie)
  std::vector<bool> observed_;               // by functions_ index: false once reduce() dropped it
  std::vector<SkippedFunction> skipped_;
  std::function<void(const std::string&)> progress_;
  ProbeMechanism mechanism_ = ProbeMechanism::automatic;
  bool returns_ = true;
  double attach_ms_ = 0;
  watch_bpf* skel_ = nullptr;
  std::unique_ptr<Links> links_;
};

// Ids of the BPF links that exist on the system now (for leak checks in tests and tools).
std::vector<uint32_t> bpf__link_ids();

}  // namespace hotfix
