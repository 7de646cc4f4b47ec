// Stop-the-world control of a running process with ptrace: seize every thread, stop them
// all, let the caller inspect and change them, resume them, detach. The target survives
// hotfix dying (no PTRACE_O_EXITKILL; the kernel detaches tracees when their tracer exits),
// and no signal sent to it while we hold it is lost: it is delivered when we let go.
#pragma once
#include <sched.h>
#include <signal.h>
#include <time.h>
#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "arch/arch.hpp"
#include "common/error.hpp"
#include "process/memory.hpp"

namespace hotfix {

using TraceClock = std::chrono::steady_clock;

// How a traced thread is stopped: decides how it may be used and how it is resumed.
enum class StopKind {
  running,    // not stopped by us (or a stop not collected yet)
  interrupt,  // PTRACE_INTERRUPT stop, or a new thread's first stop: at the kernel->user boundary
  signal,     // signal-delivery-stop (also after a single-step or a trap): the signal is delivered on resume
  group,      // group-stop (SIGSTOP/SIGTSTP/...): resumed with PTRACE_LISTEN, so it stays stopped
  event,      // a ptrace event inside a system call (clone): pc/sp are final, other registers not
};
const char* stop_kind__name(StopKind k);

struct TracedThread {
  pid_t tid = 0;
  StopKind stop = StopKind::running;
  arch::RegsBuffer regs{};            // read when it stopped; valid while stopped
  bool regs_dirty = false;            // registers we wrote and have not restored yet
  int resume_signal = 0;              // delivered on resume (the signal of its signal-delivery-stop)
  std::optional<siginfo_t> resume_info;
  std::vector<int> late_signals;      // more signals dequeued while we held it: re-sent on resume
  bool awaiting_first_stop = false;   // auto-attached new thread; reports a stop by itself
  bool exited = false;
  TraceClock::time_point stop_began{};  // when we asked it to stop (or saw it stop)

  bool stopped() const { return stop != StopKind::running; }
  // At a stop where its registers may be replaced to run code (remote syscall/call).
  bool usable_for_remote() const { return stop == StopKind::interrupt || stop == StopKind::signal; }
};

// One stop-the-world window, measured per thread.
struct PauseStats {
  size_t threads = 0;
  std::chrono::nanoseconds max_pause{};     // longest any one thread was held: interrupt sent -> resumed
  std::chrono::nanoseconds stop_latency{};  // first interrupt sent -> every thread stopped, registers read
  std::chrono::nanoseconds window{};        // first interrupt sent -> last thread resumed
};

// Runs the calling thread at SCHED_FIFO (lowest priority) between raise() and lower().
class RealtimeBoost {
 public:
  void raise();
  void lower();
  bool active() const { return active_; }

 private:
  bool active_ = false;
  int old_policy_ = 0;
  sched_param old_param_{};
};

// Interrupts blocking waits of the calling thread at `deadline` (a POSIX timer sending an
// otherwise unused real-time signal with an empty handler). armed() is false if it could not
// be set up (signal in use or blocked): then the caller polls.
class WaitAlarm {
 public:
  explicit WaitAlarm(TraceClock::time_point deadline);
  ~WaitAlarm();
  WaitAlarm(const WaitAlarm&) = delete;
  WaitAlarm& operator=(const WaitAlarm&) = delete;
  bool armed() const { return armed_; }

 private:
  timer_t timer_{};
  bool armed_ = false;
};

class Tracee {
 public:
  // PTRACE_SEIZE every thread of `pid` (rescanning /proc/PID/task until the set is stable).
  // Threads keep running. Fails cleanly (nothing left attached) if the pid does not exist,
  // is already traced (gdb, strace), is job-control stopped, or exits meanwhile.
  static Result<Tracee> seize(pid_t pid);
  Tracee(Tracee&& o) noexcept;
  Tracee& operator=(Tracee&&) = delete;
  Tracee(const Tracee&) = delete;
  // Restores registers we changed and detaches every thread (stopping them briefly if needed).
  ~Tracee();

  pid_t pid() const { return pid_; }
  const std::string& comm() const { return comm_; }
  const ProcessMemory& memory() const { return memory_; }
  const std::vector<TracedThread>& threads() const { return threads_; }
  TracedThread* find(pid_t tid);
  bool all_stopped() const;
  // An error once the process has exited or exec'd (every call checks this first).
  Result<void> check_alive() const;

  // Stop every thread (new ones included) and read its registers. The window is: interrupt
  // all, collect each stop (reading registers as it comes), return. On timeout (a thread in
  // uninterruptible sleep) resumes what it stopped and fails naming the thread.
  Result<void> stop_all(std::chrono::milliseconds timeout = std::chrono::seconds(2));
  // Resume every stopped thread in the order they were asked to stop, restoring registers
  // we changed and delivering signals that arrived meanwhile. Records last_pause().
  Result<void> resume_all();
  const PauseStats& last_pause() const { return pause_; }

  // One thread only (the others keep running; their events are serviced meanwhile).
  Result<void> stop_thread(pid_t tid, std::chrono::milliseconds timeout = std::chrono::seconds(2));
  Result<void> resume_thread(pid_t tid);

  // Service events of running threads (signals to deliver, new threads, exits) for up to
  // `budget` (one pass when zero). Call it while holding the process for long.
  Result<void> pump(std::chrono::milliseconds budget = {});

  // Detach now (what the destructor does), reporting failures.
  Result<void> detach();

  // ---- for the remote-execution layer (process/remote.cpp) ----
  // Write `regs` into stopped thread `tid` (marks them dirty until restore_regs).
  Result<void> set_regs(pid_t tid, const arch::RegsBuffer& regs);
  Result<void> restore_regs(pid_t tid);
  // Resume `tid` with `request` (PTRACE_SINGLESTEP / PTRACE_CONT) and signal `sig` without
  // touching its registers; it counts as running until wait_stop() returns.
  Result<void> step(pid_t tid, int request, int sig = 0);
  // Wait for the next stop or exit of `tid`, servicing the other running threads; returns
  // the raw wait status (the thread is marked stopped with its kind, registers NOT re-read).
  Result<int> wait_stop(pid_t tid, TraceClock::time_point deadline);
  // Record a signal the thread dequeued while we ran code on it, to deliver when resumed.
  void defer_signal(pid_t tid, int sig);

  // Addresses found once per target by the remote layer.
  struct RemoteCache {
    uint64_t syscall_gadget = 0;    // syscall; ret
    uint64_t sigreturn_gadget = 0;  // glibc's __restore_rt
    // A thread's sigaltstack (stack_t bytes), read once per stop (stop_began) for its frames.
    struct AltStack {
      pid_t tid = 0;
      TraceClock::time_point stop_began{};
      std::vector<uint8_t> bytes;
    };
    std::vector<AltStack> altstacks;
    struct Range {
      uint64_t begin = 0, end = 0;
      std::string name;
    };
    std::vector<Range> lock_ranges;  // sorted; code that may hold the loader/malloc locks
    bool lock_ranges_known = false;
    uint64_t dlopen = 0, dlerror = 0, dlclose = 0, dlsym = 0;
  };
  RemoteCache& remote_cache() { return cache_; }

 private:
  Tracee(pid_t pid, ProcessMemory memory) : pid_(pid), memory_(std::move(memory)) {}
  Result<void> stop_all_impl(std::chrono::milliseconds timeout, bool resume_on_failure);
  Result<void> seize_stable_set();
  Result<void> seize_thread(pid_t tid, bool& added);
  TracedThread& add_thread(pid_t tid, bool awaiting_first_stop);
  // Non-blocking wait for `tid`; returns 0 if nothing happened.
  pid_t poll(pid_t tid, int& status, bool block = false);
  // Book-keeping every wait status needs (exits, new threads, stop kind, siginfo).
  void note_status(TracedThread& th, int status);
  // A running thread stopped by itself: let it go on (delivering its signal).
  void pass_through(TracedThread& th, int status);
  Result<void> resume_one(TracedThread& th, bool detach);
  Result<void> detach_after_exec();
  void forget_exited();
  Error gone_error() const;
  bool leader_is_zombie() const;       // only the leader is left, and it is a zombie
  void reap_dead_threads();
  // Threads we hold that a SIGKILL (a group exit: a fatal signal, exit_group, kill -9) has
  // woken from their stop: they no longer answer ptrace as stopped, and will report their
  // exit. Marks them running again and appends their indices to `pending`; returns how many.
  size_t take_back_killed(std::vector<size_t>& pending);
  std::string zombie_exit_how() const;

  pid_t pid_ = 0;
  std::string comm_;
  bool we_are_parent_ = false;  // then its final exit status is not ours to reap
  bool gone_ = false;
  bool killed_while_held_ = false;  // a thread we held was woken by SIGKILL: the process is exiting
  bool exec_seen_ = false;  // PTRACE_EVENT_EXEC: the process runs a new program (gone_ is set too)
  std::string gone_how_;
  bool detached_ = false;
  ProcessMemory memory_;
  std::vector<TracedThread> threads_;  // in the order they are interrupted and resumed
  PauseStats pause_;
  TraceClock::time_point window_began_{};
  RemoteCache cache_;
  RealtimeBoost boost_;  // held from stop_all to resume_all/detach
};

// One thread of a process stopped on its own, while the object lives: PTRACE_SEIZE of that
// thread alone, PTRACE_INTERRUPT, its registers read; the destructor lets it go (PTRACE_DETACH,
// delivering a signal it dequeued meanwhile). The other threads are not touched. For looking
// at a running thread's stack (observe/inside.hpp): hold it only as long as that takes.
class ThreadHold {
 public:
  // Fails, leaving the thread running, if it cannot be seized (traced already, gone) or does
  // not stop within `timeout` (then it is released as soon as it stops: release_late()).
  static Result<ThreadHold> stop(pid_t pid, pid_t tid, std::chrono::milliseconds timeout);
  ThreadHold(ThreadHold&& o) noexcept;
  ThreadHold& operator=(ThreadHold&&) = delete;
  ThreadHold(const ThreadHold&) = delete;
  ~ThreadHold();
  pid_t tid() const { return tid_; }
  const arch::RegsBuffer& regs() const { return regs_; }
  // Detach the threads whose stop came after stop() gave up on them (called by stop() too):
  // until then they sit in their stop, so a caller that gave up calls this again soon.
  static void release_late();
  static size_t late_count();

 private:
  ThreadHold(pid_t tid, int signal, const arch::RegsBuffer& regs) : tid_(tid), signal_(signal), regs_(regs) {}
  pid_t tid_ = 0;
  int signal_ = 0;  // dequeued by the thread while we held it: delivered by the detach
  arch::RegsBuffer regs_{};
};

// "already traced by pid 4242 (gdb)" check, usable before seizing: 0 if untraced.
pid_t process__tracer(pid_t pid);

}  // namespace hotfix
