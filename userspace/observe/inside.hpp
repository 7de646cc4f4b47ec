// "Threads inside": how many threads of a process have a function on their stack now, from
// one look at every thread -- including threads that entered long before any probe came
// (probes see only calls that begin after them).
//
// A thread blocked in the kernel is read without stopping it: its pc and stack pointer from
// /proc/PID/task/TID/syscall, its stack with process_vm_readv, checked afterwards not to have
// run meanwhile (/proc/TID/schedstat). A running thread is stopped on its own, only while its
// stack is read and unwound (ptrace seize + interrupt of that one thread, then detach); no
// two threads are ever held at once. The unwinder is the consistency check's (libdw, CFI).
// Where a stack cannot be unwound far enough to tell, the thread counts as "unknown" for the
// functions it may be in -- never as 0.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

class Watch;

struct InsideCount {
  int64_t threads = 0;      // threads with the function on their stack, for certain
  int64_t activations = 0;  // its frames on those stacks (a recursive function counts each)
  size_t unknown = 0;       // threads whose stack could not be read far enough to tell
  bool known() const { return unknown == 0; }
};

struct InsideOptions {
  std::chrono::milliseconds stop_timeout{50};  // a running thread that does not stop: unknown
  bool stop_running = true;                    // false: running threads are unknown
  // A thread blocked in the kernel whose stack cannot be unwound from its pc and stack
  // pointer alone (a frame needs another register, e.g. a frame pointer): stop it briefly too,
  // for all its registers. Off by default: the stop interrupts its system call, and while
  // most restart, `epoll_wait` returns EINTR to the program (signal(7)). Off: unknown.
  bool stop_blocked_if_needed = false;
  // Called for each function of a thread found inside one (or unknown), while that thread
  // holds still: InsideThread::tracked (InflightSeed: the calls the probes track).
  std::function<uint32_t(pid_t tid, size_t function)> tracked;
};

// One look, per thread: which functions it is inside (only threads inside one, or unknown).
struct InsideThread {
  pid_t tid = 0;
  std::vector<uint32_t> frames;  // per function (the order asked): its frames on this stack
  std::vector<bool> unknown;     // per function: could not tell
  std::vector<uint32_t> tracked; // per function, when InsideOptions::tracked is set
};

struct InsideSnapshot {
  std::vector<InsideCount> functions;  // in the order asked
  std::vector<InsideThread> threads;   // those inside a function, or unknown for one
  size_t looked_at = 0;                // threads looked at
  size_t read_blocked = 0;             // of those, read without stopping them
  size_t stopped = 0;                  // stopped briefly, one at a time
  std::chrono::nanoseconds longest_stop{};  // the longest any one thread was held
  std::vector<std::string> notes;           // why some threads are unknown, one line per reason
};

// The expensive part (the libdw view of the process's modules) made once; look() many times.
class InsideLook {
 public:
  static Result<InsideLook> create(pid_t pid, std::vector<Function> functions);
  InsideLook(InsideLook&&) noexcept;
  InsideLook& operator=(InsideLook&&) noexcept;
  ~InsideLook();

  // Look at every thread, or only at `only` (gone ones are skipped).
  Result<InsideSnapshot> look(const InsideOptions& opts = {}, const std::vector<pid_t>* only = nullptr);
  const std::vector<Function>& functions() const;

 private:
  struct State;
  explicit InsideLook(std::unique_ptr<State> s);
  std::unique_ptr<State> s_;
};

// snapshot(pid, functions): the one-call form (builds and drops an InsideLook).
Result<InsideSnapshot> inside__snapshot(pid_t pid, const std::vector<Function>& functions,
                                        const InsideOptions& opts = {});

// "1", "≥1 (2 threads unknown)", "unknown (2 threads)": threads inside, for people.
std::string inside__describe(const InsideCount& c);

// watch --inflight from the start. The probes count calls that began after them, and their
// returns; a thread already inside when they came is invisible to both. So right after attach
// one look finds, per thread and function, the frames the probes do not track (frames on the
// stack minus the calls the probes saw enter and not return: BPF's per-thread table), and
// later looks at those threads only tell when they leave -- a frame from before can only go.
// In flight = those still inside + calls - returns.
class InflightSeed {
 public:
  // After Watch::attach (with return probes). Functions without return probes are not seeded.
  static Result<InflightSeed> take(pid_t pid, const Watch& watch, const InsideOptions& opts = {});
  // Look again at the threads still seeded (cheap: only those; blocked ones are not stopped).
  Result<void> refresh(const Watch& watch);
  // Per Watch::functions() index: frames from before the probes, still inside; and threads
  // that could not be read (their share is unknown).
  int64_t seeded(size_t i) const { return i < seeded_.size() ? seeded_[i] : 0; }
  size_t unknown(size_t i) const { return i < unknown_.size() ? unknown_[i] : 0; }
  const std::vector<std::string>& notes() const { return notes_; }
  const InsideSnapshot& first() const { return first_; }

 private:
  InflightSeed(InsideLook look, InsideOptions opts) : look_(std::move(look)), opts_(opts) {}
  void apply(const InsideSnapshot& s, const Watch& watch, bool first);
  InsideLook look_;
  InsideOptions opts_;
  // Per thread: per function, its untracked frames (nullopt: unknown).
  struct Seeded {
    pid_t tid = 0;
    std::vector<std::optional<uint32_t>> frames;
  };
  std::vector<Seeded> threads_;
  std::vector<int64_t> seeded_;
  std::vector<size_t> unknown_;
  std::vector<std::string> notes_;
  InsideSnapshot first_;
};

}  // namespace hotfix
