// The switch: stop every thread, check that none runs (or, strict, will return into) what is
// about to change, write the new bytes and record them in the same stop; retry with a backoff
// until the deadline. Shared by patch (apply.cpp) and revert (revert.cpp).
#pragma once
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "observe/liveness.hpp"
#include "patch/consistency.hpp"
#include "patch/engine.hpp"
#include "process/maps.hpp"
#include "process/ptrace.hpp"

namespace hotfix {

class ProcessMemory;

uint64_t realtime_ns();
std::string hex_bytes(const std::vector<uint8_t>& bytes);
std::vector<StoppedThread> stopped_threads(const Tracee& t);

// The strict wait stops the whole process at most this often, whatever happens (a waiter
// that keeps reading "quiet" while the stop keeps finding a thread inside included).
inline constexpr std::chrono::milliseconds kMinStopInterval{20};  // <= 50 stops a second
// Blind retries (no waiter, or one that cannot see a blocker leave): 2, 4, ... 50 ms after
// each blocked stop, and never sooner than kMinStopInterval after the last one.
inline constexpr std::chrono::milliseconds kFirstBackoff{2}, kMaxBackoff{50};
// With a waiter that sees every blocker it stops the moment they have left; the blind retry is
// then only a safety net (an exit the probes cannot see: an exception, longjmp, a thread
// exiting inside), so it backs off further: 100, 200, ... 1000 ms.
inline constexpr std::chrono::milliseconds kFirstWatchedBackoff{100}, kMaxWatchedBackoff{1000};
// After this many attempts blocked by the same thread in the same function, say so (once).
inline constexpr int kStuckAttempts = 4;

// What must not be running for a switch, by consistency mode.
struct Guard {
  Consistency mode;
  std::vector<AddressRange> overwritten;  // entry mode: the bytes under the jump
  // Frames: strict mode, no frame in the bodies; entry mode, none resuming inside the bytes under
  // the jump (a pc saved in a signal frame, a return address).
  std::optional<ConsistencyChecker> strict;
  std::optional<QuietWaiter> waiter;      // strict mode: uprobes pick the moment to stop
  std::vector<Function> quiet;            // what the waiter watches, once a first stop was blocked
  pid_t pid = 0;

  // Until the waiter sees every blocker of the last stop leave (and nobody else inside), but
  // not before `earliest` (the rate bound) nor after `latest` (the blind retry), servicing
  // the target's signals. Without a waiter that can see them: until `latest`. Returns early,
  // without error, when the target has exited: the stop that follows reports how.
  Result<void> wait_for_quiet(Tracee& t, std::chrono::steady_clock::time_point earliest,
                              std::chrono::steady_clock::time_point latest);
  // After a blocked stop: inside the stop window, restart the waiter's count from the
  // blockers; after the first one, attach the probes (and seed them with those blockers).
  // The first attempt goes without probes: attaching and (at the end) detaching costs tens
  // of ms, more than most patches need in all.
  void seed(const std::vector<Blocker>& blockers);
  void rearm(const std::vector<Blocker>& blockers);

  // The kernel's out-of-line area for probed instructions ("[uprobes]"), read before each stop:
  // a thread stopped there is executing some function's displaced first instruction and will
  // resume right after it -- possibly inside bytes we are about to overwrite.
  std::optional<AddressRange> xol;
  void note_xol_area(pid_t pid) {
    if (auto maps = process__read_maps(pid))
      for (auto& m : *maps)
        if (m.path == "[uprobes]") xol = AddressRange{m.start, m.end, "a probed instruction (uprobe single-step)"};
  }

  Result<std::vector<Blocker>> check(const std::vector<StoppedThread>& threads) {
    auto guarded = overwritten;
    if (xol) guarded.push_back(*xol);
    auto blockers = consistency__check_entry(threads, guarded);
    if (!blockers.empty() || !strict) return blockers;
    return strict->check(threads);
  }
};

// `quiet`: functions whose threads-inside count drives the moment of the stop (strict mode).
Result<Guard> make_guard(pid_t pid, Consistency mode, std::vector<AddressRange> overwritten,
                         std::vector<AddressRange> bodies, const std::vector<Function>& quiet = {});

// The bytes of one switch: where, what must be there now, what goes there.
struct TextWrite {
  uint64_t address;
  std::vector<uint8_t> expected, bytes;
  std::string name;
};

// Inside the stop window: verify every site still holds what we planned against, then write
// all of them; on a failed write, put back what was already written.
Result<void> write_all(const ProcessMemory& mem, const std::vector<TextWrite>& writes);

struct SwitchResult {
  std::chrono::nanoseconds pause{};
  int attempts = 0;
};

// Stop the world until the guard passes (or the deadline), then write and record in one stop.
Result<SwitchResult> switch_when_quiet(Tracee& t, Guard& guard, const std::vector<TextWrite>& writes,
                                       const std::function<Result<void>()>& record, std::chrono::milliseconds timeout,
                                       const ProgressFn& progress);

// The bytes under a jump at `address` that no thread may be executing (entry mode).
AddressRange overwritten_range(uint64_t address, size_t covered, const std::string& name);

// A step failed: if the target died meanwhile, that is what to say (the step's own error,
// "cannot open the memory of process N" or "could not stop every thread", is a symptom).
template <class T>
Result<T> or_target_gone(Tracee& t, Result<T> r) {
  if (r) return r;
  // A dying process reports its threads' exits one by one, the leader's last: collect them.
  auto budget = process__alive(t.pid()) ? std::chrono::milliseconds(0) : std::chrono::milliseconds(500);
  if (auto alive = t.pump(budget); !alive) return std::unexpected(alive.error());
  // The kernel reports a zombie leader's exit only to its parent (not us, unless we started
  // it), so pump may never learn of it; stop_all recognises that case and says how it died.
  if (!process__alive(t.pid())) {
    if (auto stopped = t.stop_all(std::chrono::milliseconds(100)); !stopped) return std::unexpected(stopped.error());
    (void)t.resume_all();
  }
  return r;
}


}  // namespace hotfix
