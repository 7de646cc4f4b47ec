// The switch (see switch.hpp).
#include "patch/switch.hpp"

#include <time.h>

#include <algorithm>
#include <map>
#include <thread>

#include "process/memory.hpp"

namespace hotfix {

using namespace std::chrono;

uint64_t realtime_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::string hex_bytes(const std::vector<uint8_t>& bytes) {
  std::string s;
  for (auto b : bytes) s += fmt::format("{}{:02x}", s.empty() ? "" : " ", b);
  return s;
}

// The bytes the file had at `address` before any active patch: the oldest active patch there
std::vector<StoppedThread> stopped_threads(const Tracee& t) {
  std::vector<StoppedThread> out;
  for (auto& th : t.threads())
    if (th.stopped() && !th.exited) out.push_back({th.tid, th.regs});
  return out;
}

// `quiet`: functions whose threads-inside count drives the moment of the stop (strict mode).
Result<Guard> make_guard(pid_t pid, Consistency mode, std::vector<AddressRange> overwritten,
                         std::vector<AddressRange> bodies, const std::vector<Function>& quiet) {
  Guard g{mode, std::move(overwritten), std::nullopt, std::nullopt, {}, pid, std::nullopt};
  if (mode != Consistency::strict) return g;
  g.strict = HOTFIX_TRY(ConsistencyChecker::create(pid, std::move(bodies)));
  g.quiet = quiet;
  return g;
}

// Inside the stop window: verify every site still holds what we planned against, then write
// all of them; on a failed write, put back what was already written.
Result<void> write_all(const ProcessMemory& mem, const std::vector<TextWrite>& writes) {
  for (auto& w : writes) {
    auto now = HOTFIX_TRY(mem.read(w.address, w.expected.size()));
    if (now != w.expected)
      return fail(fmt::format("the first bytes of {} changed under us ({} instead of {})", w.name, hex_bytes(now),
                              hex_bytes(w.expected)),
                  "another tool is patching this process; nothing was changed");
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    if (auto r = mem.write(writes[i].address, writes[i].bytes); !r) {
      for (size_t j = 0; j < i; ++j) (void)mem.write(writes[j].address, writes[j].expected);
      return std::unexpected(r.error());
    }
  }
  return {};
}


// Stop the world until the guard passes (or the deadline), then write and record in one stop.
Result<SwitchResult> switch_when_quiet(Tracee& t, Guard& guard, const std::vector<TextWrite>& writes,
                                       const std::function<Result<void>()>& record, milliseconds timeout,
                                       const ProgressFn& progress) {
  SwitchResult r;
  auto deadline = steady_clock::now() + timeout;
  auto backoff = milliseconds(2);
  std::map<pid_t, int> blocked_in;  // attempts each thread blocked: the error names the most stubborn
  for (;;) {
    ++r.attempts;
    // With probes: stop as soon as they see nobody inside, but no later than the backoff, so a
    // function that is never quiet as a whole still gets blind attempts.
    guard.wait_for_quiet(t, std::min(deadline, steady_clock::now() + backoff));
    guard.note_xol_area(t.pid());
    HOTFIX_CHECK(t.stop_all());
    auto blockers = guard.check(stopped_threads(t));
    Result<void> done = blockers ? Result<void>{} : std::unexpected(blockers.error());
    if (blockers && blockers->empty()) {
      done = write_all(t.memory(), writes);
      if (done && !(done = record()))  // unrecorded jumps must not outlive the undo of their target
        for (auto& w : writes) (void)t.memory().write(w.address, w.expected);
    }
    auto resumed = t.resume_all();
    r.pause = std::max(r.pause, duration_cast<nanoseconds>(t.last_pause().max_pause));
    HOTFIX_CHECK(resumed);
    if (!done) return std::unexpected(done.error());
    if (blockers->empty()) return r;
    for (auto& b : *blockers) blocked_in[b.tid]++;
    const Blocker& b = *std::max_element(blockers->begin(), blockers->end(),
                                         [&](auto& x, auto& y) { return blocked_in[x.tid] < blocked_in[y.tid]; });
    if (steady_clock::now() + backoff > deadline)
      return fail(fmt::format("{} after {} attempts in {} ms ({} consistency); nothing was changed",
                              blocker__describe(b), r.attempts, timeout.count(), consistency__name(guard.mode)),
                  guard.mode == Consistency::strict
                      ? "retry when it is idle, raise --timeout, or use --consistency entry to let running calls finish in the old code"
                      : "retry; a thread is executing the very bytes the jump would overwrite");
    progress(fmt::format("attempt {}: {}; retrying", r.attempts, blocker__describe(b)));
    guard.rearm();
    if (!guard.waiter) std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, milliseconds(50));
  }
}

AddressRange overwritten_range(uint64_t address, size_t covered, const std::string& name) {
  // A thread stopped exactly at the entry is fine: it will execute the jump.
  return {address + 1, address + covered, name};
}

}  // namespace hotfix
