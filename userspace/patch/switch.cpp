// The switch (see switch.hpp).
#include "patch/switch.hpp"

#include <time.h>

#include <algorithm>
#include <map>
#include <thread>

#include "process/maps.hpp"
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
  if (mode != Consistency::strict) {
    // A thread whose pc is elsewhere may still resume inside the bytes under the jump: one
    // interrupted there runs a signal handler now, its pc saved in the signal frame on its
    // stack (or a call among those bytes left a return address). The frame check finds both.
    if (!g.overwritten.empty()) g.strict = HOTFIX_TRY(ConsistencyChecker::create(pid, g.overwritten));
    return g;
  }
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


namespace {

std::vector<QuietWaiter::Inside> inside_of(const std::vector<Blocker>& blockers) {
  std::vector<QuietWaiter::Inside> out;
  for (auto& b : blockers) out.push_back({b.pc, b.frame == 0 && !b.unwind_incomplete});
  return out;
}

// The thread that blocks in the same function attempt after attempt: a loop that does not
// return looks like this (and a return address that stays the same: it calls out of the loop).
struct Streak {
  pid_t tid = 0;
  std::string function;
  uint64_t pc = 0;
  int attempts = 0;
  bool same_pc = true;

  void note(const std::vector<Blocker>& blockers, const Blocker& stubborn) {
    auto same = std::find_if(blockers.begin(), blockers.end(),
                             [&](const Blocker& b) { return attempts && b.tid == tid && b.function == function; });
    if (same == blockers.end()) {
      *this = {stubborn.tid, stubborn.function, stubborn.pc, 1, true};
      return;
    }
    ++attempts;
    same_pc = same_pc && same->pc == pc;
  }
  bool stuck() const { return attempts >= kStuckAttempts; }
};

Error timeout_error(const Blocker& b, const Streak& streak, int attempts, milliseconds timeout, Consistency mode) {
  if (streak.stuck())
    return Error{fmt::format("{}{} on each of the last {} of {} attempts in {} ms ({} consistency); nothing was changed",
                             blocker__describe(b), streak.same_pc ? " at the same place" : "", streak.attempts,
                             attempts, timeout.count(), consistency__name(mode)),
                 progress__stuck_hint(b) + "; if it does return, raise --timeout"};
  return Error{fmt::format("{} after {} attempts in {} ms ({} consistency); nothing was changed", blocker__describe(b),
                           attempts, timeout.count(), consistency__name(mode)),
               mode == Consistency::strict
                   ? "retry when it is idle, raise --timeout, or use --consistency entry to let running calls finish in the old code"
                   : "retry; a thread is executing the very bytes the jump would overwrite"};
}

}  // namespace

Result<void> Guard::wait_for_quiet(Tracee& t, steady_clock::time_point earliest, steady_clock::time_point latest) {
  // A target that exits while we wait: its threads' exits may never all reach us (the leader
  // is reported last, and only to its parent once it is a zombie), and a count of threads
  // inside stays up forever; look at /proc each round, and let the stop say what happened.
  auto service = [&](steady_clock::time_point until) -> Result<bool> {
    HOTFIX_CHECK(t.pump());
    if (!process__alive(t.pid())) return false;
    auto now = steady_clock::now();
    if (now < until) std::this_thread::sleep_for(std::min(duration_cast<milliseconds>(until - now), milliseconds(5)));
    return true;
  };
  while (steady_clock::now() < earliest)
    if (!HOTFIX_TRY(service(earliest))) return {};
  bool watch = waiter && waiter->sees_all();
  while (steady_clock::now() < latest) {
    if (watch && waiter->wait_quiet(std::min(latest, steady_clock::now() + milliseconds(10)))) return {};
    if (!HOTFIX_TRY(service(watch ? steady_clock::now() : latest))) return {};
  }
  return {};
}

void Guard::seed(const std::vector<Blocker>& blockers) {
  if (waiter) waiter->seed(inside_of(blockers));
}

void Guard::rearm(const std::vector<Blocker>& blockers) {
  if (waiter || quiet.empty()) return;
  if (auto w = QuietWaiter::attach(pid, quiet)) {
    waiter.emplace(std::move(*w));
    waiter->seed(inside_of(blockers));  // running meanwhile: the next stop reseeds exactly
  } else {
    quiet.clear();  // blind retries from now on
  }
}

// Stop the world until the guard passes (or the deadline), then write and record in one stop.
Result<SwitchResult> switch_when_quiet(Tracee& t, Guard& guard, const std::vector<TextWrite>& writes,
                                       const std::function<Result<void>()>& record, milliseconds timeout,
                                       const ProgressFn& progress) {
  SwitchResult r;
  auto deadline = steady_clock::now() + timeout;
  auto backoff = kFirstBackoff, watched_backoff = kFirstWatchedBackoff;
  std::map<pid_t, int> blocked_in;  // attempts each thread blocked: the error names the most stubborn
  Streak streak;
  Blocker reported;  // the blocker of the last waiting event
  bool said_stuck = false;
  steady_clock::time_point last_stop{}, blind_at{};
  for (;;) {
    if (r.attempts > 0)  // the rate bound holds for every attempt, quiet or not
      HOTFIX_CHECK(guard.wait_for_quiet(t, std::min(deadline, last_stop + kMinStopInterval),
                                        std::min(deadline, std::max(last_stop + kMinStopInterval, blind_at))));
    ++r.attempts;
    guard.note_xol_area(t.pid());
    last_stop = steady_clock::now();
    HOTFIX_CHECK(t.stop_all());
    auto threads = stopped_threads(t);
    auto blockers = guard.check(threads);
    Result<void> done = blockers ? Result<void>{} : std::unexpected(blockers.error());
    if (done && threads.empty())  // every thread gone without the kernel telling us: it exited
      done = fail(fmt::format("process {} exited while hotfix was attached to it", t.pid()), "nothing to patch");
    else if (blockers && blockers->empty()) {
      done = write_all(t.memory(), writes);
      if (done && !(done = record()))  // unrecorded jumps must not outlive the undo of their target
        for (auto& w : writes) (void)t.memory().write(w.address, w.expected);
    } else if (blockers) {
      guard.seed(*blockers);  // the counters are still: the count of threads inside is exact now
    }
    auto resumed = t.resume_all();
    r.pause = std::max(r.pause, duration_cast<nanoseconds>(t.last_pause().max_pause));
    HOTFIX_CHECK(resumed);
    if (!done) return std::unexpected(done.error());
    if (blockers->empty()) return r;
    consistency__name_threads(*blockers);  // resumed: /proc reads stay out of the stop window
    for (auto& b : *blockers) blocked_in[b.tid]++;
    Blocker b = *std::max_element(blockers->begin(), blockers->end(),
                                  [&](auto& x, auto& y) { return blocked_in[x.tid] < blocked_in[y.tid]; });
    streak.note(*blockers, b);
    if (streak.stuck())  // name the thread that never leaves, not one passing through
      b = *std::find_if(blockers->begin(), blockers->end(), [&](auto& x) { return x.tid == streak.tid; });
    auto now = steady_clock::now();
    if (std::max(now, last_stop + kMinStopInterval) >= deadline)
      return std::unexpected(timeout_error(b, streak, r.attempts, timeout, guard.mode));
    ProgressEvent e;
    e.kind = streak.stuck() && !said_stuck ? ProgressEvent::Kind::stuck : ProgressEvent::Kind::waiting;
    e.attempt = r.attempts;
    e.blocker = b;
    e.blockers = static_cast<int>(blockers->size());
    e.blocker_changed = r.attempts == 1 || b.tid != reported.tid || b.function != reported.function;
    e.same_place = streak.attempts;
    e.same_pc = streak.same_pc;
    e.left = duration_cast<milliseconds>(deadline - now);
    e.text = progress_event__describe(e);
    said_stuck |= e.kind == ProgressEvent::Kind::stuck;
    reported = e.blocker;
    progress(e);
    guard.rearm(*blockers);
    bool watched = guard.waiter && guard.waiter->sees_all();
    auto& next = watched ? watched_backoff : backoff;
    blind_at = steady_clock::now() + next;
    next = std::min(next * 2, watched ? kMaxWatchedBackoff : kMaxBackoff);
  }
}

AddressRange overwritten_range(uint64_t address, size_t covered, const std::string& name) {
  // A thread stopped exactly at the entry is fine: it will execute the jump.
  return {address + 1, address + covered, name};
}

}  // namespace hotfix
