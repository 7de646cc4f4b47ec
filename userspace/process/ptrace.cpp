#include "process/ptrace.hpp"

#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <utility>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "process/maps.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

// Only what we need to see; no PTRACE_O_EXITKILL: the target must outlive us. TRACEEXEC: a
// target that execs while we hold it must be noticed -- every address we know (the loader,
// the functions, the mappings we made) belongs to the old image and means nothing in the new.
// TRACESYSGOOD: the remote layer follows its code with PTRACE_SYSCALL and must tell syscall
// stops (SIGTRAP | 0x80) from a real SIGTRAP.
constexpr long kSeizeOptions = PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD;

long ptrace_req(int request, pid_t tid, unsigned long addr = 0, unsigned long data = 0) {
  return ::ptrace(static_cast<__ptrace_request>(request), tid, reinterpret_cast<void*>(addr),
                  reinterpret_cast<void*>(data));
}

int stop_event(int status) { return status >> 16; }

bool is_group_stop_signal(int sig) { return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU; }

// A thread caught in a signal-delivery-stop has dequeued its signal: only we hold it, and the
// kernel drops it if we die (it does not deliver the signal of a stop whose tracer exits). So
// put it back in the thread's pending set -- with its siginfo where the kernel lets us
// (sigqueue'd and timer signals), else plainly -- and let the thread trap again at once into an
// interrupt stop. Returns that stop's wait status, or 0 if the signal stays with us (stop
// signals keep their group-stop handling; a re-send that fails), -1 if the thread vanished.
int requeue_at_signal_stop(pid_t pid, pid_t tid, int sig) {
  if (sig == SIGKILL || is_group_stop_signal(sig)) return 0;
  siginfo_t si{};
  if (ptrace_req(PTRACE_GETSIGINFO, tid, 0, reinterpret_cast<unsigned long>(&si)) != 0 || si.si_signo != sig) return 0;
  bool exact = si.si_code < 0 && si.si_code != SI_TKILL &&
               ::syscall(SYS_rt_tgsigqueueinfo, pid, tid, sig, &si) == 0;
  if (!exact && ::syscall(SYS_tgkill, pid, tid, sig) != 0) return 0;
  // From here the signal is pending again: leave the stop without it (a pending interrupt
  // traps before the next signal is dequeued).
  if (ptrace_req(PTRACE_INTERRUPT, tid) != 0 || ptrace_req(PTRACE_CONT, tid) != 0) return 0;
  int status = 0;
  while (::waitpid(tid, &status, __WALL) < 0)
    if (errno != EINTR) return -1;
  return status;
}

// A thread in a ptrace stop answers any request; one that a SIGKILL has woken (a group exit
// or kill -9: nothing else ends a ptrace stop) answers ESRCH from the moment the SIGKILL is
// pending, and reports its exit to us later.
bool still_held(pid_t tid) {
  unsigned long msg = 0;
  return ptrace_req(PTRACE_GETEVENTMSG, tid, 0, reinterpret_cast<unsigned long>(&msg)) == 0 || errno != ESRCH;
}

// How long the wait for the leader blocks before looking whether the threads we hold were
// killed (its exit is reported only after theirs, which only we can collect).
constexpr auto kLeaderSlice = std::chrono::milliseconds(1);

StopKind classify_stop(int status) {
  int event = stop_event(status);
  if (event == 0) return StopKind::signal;
  if (event == PTRACE_EVENT_STOP) return is_group_stop_signal(WSTOPSIG(status)) ? StopKind::group : StopKind::interrupt;
  return StopKind::event;
}

// A field of /proc/PID/status ("TracerPid", "PPid", "State"), or "".
std::string status_field(pid_t pid, const std::string& key) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) != 0) continue;
    auto v = line.substr(key.size() + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  }
  return {};
}

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with code {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return fmt::format("killed by {}", signal_name(WTERMSIG(status)));
  return "exited";
}

// Backoff for polling waits. Sleep rather than yield: at SCHED_FIFO (see RealtimeBoost) a
// yield never lets the tracees run on our CPU. Short first -- stops come within microseconds.
struct Backoff {
  int rounds = 0;
  void pause() {
    ++rounds;
    // A tracee on our CPU needs tens of microseconds to reach its stop: do not cut it short.
    std::this_thread::sleep_for(microseconds(rounds < 5 ? 10 : std::min(1000, 50 * rounds)));
  }
};

}  // namespace

// The stop window runs at the lowest real-time priority: a thread we resume (above all a
// busy one) then cannot preempt the loop still resuming the others, which on few CPUs made
// the window grow with the number of busy threads. Needs CAP_SYS_NICE; without it, no boost.
void RealtimeBoost::raise() {
  if (active_) return;
  old_policy_ = ::sched_getscheduler(0);
  if (old_policy_ < 0 || old_policy_ == SCHED_FIFO || old_policy_ == SCHED_RR) return;
  ::sched_getparam(0, &old_param_);
  sched_param rt{};
  rt.sched_priority = ::sched_get_priority_min(SCHED_FIFO);
  active_ = ::sched_setscheduler(0, SCHED_FIFO | SCHED_RESET_ON_FORK, &rt) == 0;
}

void RealtimeBoost::lower() {
  if (!active_) return;
  ::sched_setscheduler(0, old_policy_, &old_param_);
  active_ = false;
}

namespace {
// The signal that ends a blocking wait at its deadline: taken only if nobody uses it.
int alarm_signal() { return SIGRTMAX - 2; }
void on_alarm(int) {}
bool alarm_signal_ready() {
  static const bool ready = [] {
    struct sigaction old{};
    if (::sigaction(alarm_signal(), nullptr, &old) != 0 || old.sa_handler != SIG_DFL) return false;
    struct sigaction sa{};
    sa.sa_handler = on_alarm;  // no SA_RESTART: the wait returns EINTR
    sigemptyset(&sa.sa_mask);
    return ::sigaction(alarm_signal(), &sa, nullptr) == 0;
  }();
  return ready;
}
}  // namespace

WaitAlarm::WaitAlarm(TraceClock::time_point deadline) {
  if (!alarm_signal_ready()) return;
  sigset_t mask;
  if (::pthread_sigmask(SIG_BLOCK, nullptr, &mask) != 0 || sigismember(&mask, alarm_signal())) return;
  sigevent sev{};
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = alarm_signal();
  sev._sigev_un._tid = static_cast<pid_t>(::syscall(SYS_gettid));
  if (::timer_create(CLOCK_MONOTONIC, &sev, &timer_) != 0) return;
  auto ns = duration_cast<nanoseconds>(deadline.time_since_epoch()).count();  // steady_clock is CLOCK_MONOTONIC
  itimerspec at{};
  at.it_value.tv_sec = ns / 1000000000, at.it_value.tv_nsec = ns % 1000000000;
  armed_ = ::timer_settime(timer_, TIMER_ABSTIME, &at, nullptr) == 0;
  if (!armed_) ::timer_delete(timer_);
}

WaitAlarm::~WaitAlarm() {
  if (armed_) ::timer_delete(timer_);
}

const char* stop_kind__name(StopKind k) {
  switch (k) {
    case StopKind::running: return "running";
    case StopKind::interrupt: return "interrupt-stop";
    case StopKind::signal: return "signal-delivery-stop";
    case StopKind::group: return "group-stop";
    case StopKind::event: return "event-stop";
  }
  return "?";
}

pid_t process__tracer(pid_t pid) {
  auto v = status_field(pid, "TracerPid");
  return v.empty() ? 0 : static_cast<pid_t>(std::stol(v));
}

// ---------------------------------------------------------------- seize

Result<Tracee> Tracee::seize(pid_t pid) {
  HOTFIX_CHECK(process__check_alive(pid));
  if (pid_t tracer = process__tracer(pid); tracer != 0)
    return fail(fmt::format("process {} ({}) is already traced by pid {} ({})", pid, process__comm(pid), tracer,
                            process__comm(tracer)),
                "detach the debugger or tracer first (gdb: `detach`; strace: stop it), then retry");
  auto state = status_field(pid, "State");
  if (!state.empty() && (state[0] == 'T' || state[0] == 't'))
    return fail(fmt::format("process {} ({}) is stopped ({})", pid, process__comm(pid), state),
                fmt::format("continue it first with `kill -CONT {}`", pid));
  auto memory = HOTFIX_TRY(ProcessMemory::open(pid));
  Tracee t(pid, std::move(memory));
  t.comm_ = process__comm(pid);
  auto ppid = status_field(pid, "PPid");
  t.we_are_parent_ = !ppid.empty() && std::stol(ppid) == ::getpid();
  // On failure `t` is destroyed here, which detaches whatever was seized.
  HOTFIX_CHECK(t.seize_stable_set());
  return t;
}

Result<void> Tracee::seize_stable_set() {
  // A thread created by a thread we have not seized yet is only found by listing again;
  // one created by a seized thread is auto-attached (TRACECLONE). So: list until nothing new.
  for (;;) {
    auto tids = process__list_threads(pid_);
    if (!tids) {
      gone_ = true, gone_how_ = "exited";
      return std::unexpected(gone_error());
    }
    bool any_new = false;
    for (pid_t tid : *tids) {
      if (find(tid)) continue;
      bool added = false;
      HOTFIX_CHECK(seize_thread(tid, added));
      any_new = any_new || added;
    }
    if (!any_new) break;
  }
  if (threads_.empty() || !process__alive(pid_)) {
    gone_ = true, gone_how_ = "exited";
    return std::unexpected(gone_error());
  }
  return {};
}

Result<void> Tracee::seize_thread(pid_t tid, bool& added) {
  if (ptrace_req(PTRACE_SEIZE, tid, 0, kSeizeOptions) == 0) {
    add_thread(tid, false);
    added = true;
    return {};
  }
  int err = errno;
  if (err == ESRCH) return {};  // it exited between listing and seizing
  if (err == EPERM && process__tracer(tid) == ::getpid()) {
    add_thread(tid, true);  // auto-attached as the child of a thread we had seized
    added = true;
    return {};
  }
  if (err == EPERM) {
    pid_t tracer = process__tracer(tid);
    if (tracer != 0)
      return fail(fmt::format("process {} ({}) is already traced by pid {} ({})", pid_, comm_, tracer, process__comm(tracer)),
                  "detach the debugger or tracer first (gdb: `detach`; strace: stop it), then retry");
    return fail(fmt::format("not allowed to ptrace process {} ({}): {}", pid_, comm_, errno_text(err)),
                "run hotfix-ctl as root; check kernel.yama.ptrace_scope and seccomp/LSM policy");
  }
  return fail(fmt::format("cannot attach to thread {} of process {}: {}", tid, pid_, errno_text(err)));
}

TracedThread& Tracee::add_thread(pid_t tid, bool awaiting_first_stop) {
  TracedThread th;
  th.tid = tid;
  th.awaiting_first_stop = awaiting_first_stop;
  threads_.push_back(th);
  return threads_.back();
}

Tracee::Tracee(Tracee&& o) noexcept
    : pid_(o.pid_),
      comm_(std::move(o.comm_)),
      we_are_parent_(o.we_are_parent_),
      gone_(o.gone_),
      killed_while_held_(o.killed_while_held_),
      exec_seen_(o.exec_seen_),
      gone_how_(std::move(o.gone_how_)),
      detached_(o.detached_),
      memory_(std::move(o.memory_)),
      threads_(std::move(o.threads_)),
      pause_(o.pause_),
      cache_(o.cache_),
      boost_(std::exchange(o.boost_, {})) {
  o.detached_ = true;
  o.threads_.clear();
}

Tracee::~Tracee() {
  if (detached_) return;
  if (auto r = detach(); !r)
    std::fprintf(stderr, "hotfix: warning: %s\n", r.error().line().c_str());
}

TracedThread* Tracee::find(pid_t tid) {
  for (auto& th : threads_)
    if (th.tid == tid && !th.exited) return &th;
  return nullptr;
}

bool Tracee::all_stopped() const {
  return std::all_of(threads_.begin(), threads_.end(), [](auto& th) { return th.exited || th.stopped(); });
}

// A dead process's other threads stay zombies traced by us until we wait for them, and its
// leader cannot be reported to its parent before they are gone: a long-lived tracer (a test,
// a library user) must collect them. Already collected ones just answer ECHILD. A zombie
// leader we trace is visible only to us: collecting it (when we are not its parent) hands
// its exit status on to its parent.
void Tracee::reap_dead_threads() {
  bool leader_traced = false;
  for (auto& th : threads_) {
    if (th.tid == pid_) {
      leader_traced = !th.exited;
      continue;
    }
    int status;
    for (int i = 0; i < 50 && ::waitpid(th.tid, &status, __WALL | WNOHANG) == 0; ++i) ::usleep(1000);
  }
  if (!leader_traced || we_are_parent_) return;
  int status;
  for (int i = 0; i < 50 && ::waitpid(pid_, &status, __WALL | WNOHANG) == 0; ++i) ::usleep(1000);
}

size_t Tracee::take_back_killed(std::vector<size_t>& pending) {
  size_t n = 0;
  for (size_t i = 0; i < threads_.size(); ++i) {
    auto& th = threads_[i];
    if (th.exited || !th.stopped() || still_held(th.tid)) continue;
    th.stop = StopKind::running;
    pending.push_back(i);
    killed_while_held_ = true;
    ++n;
  }
  return n;
}

bool Tracee::leader_is_zombie() const {
  for (auto& th : threads_)
    if (!th.stopped() && th.tid != pid_ && !th.exited) return false;
  return status_field(pid_, "State").rfind("Z", 0) == 0;
}

// "exited with code 3" / "killed by SIGKILL", from a zombie's exit_code (/proc/PID/stat, field 52).
std::string Tracee::zombie_exit_how() const {
  std::ifstream in(fmt::format("/proc/{}/stat", pid_));
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  if (close == std::string::npos) return "exited";
  std::istringstream fields(line.substr(close + 2));
  std::string f;
  int status = -1;
  for (int i = 3; fields >> f; ++i)
    if (i == 52) status = std::atoi(f.c_str());
  return status < 0 ? "exited" : describe_exit(status);
}

Error Tracee::gone_error() const {
  if (exec_seen_)
    return Error{fmt::format("process {} ({}) replaced its program (execve) during the patch; nothing was changed", pid_, comm_),
                 "it now runs a new image: patch that one if it needs the fix", 1};
  return Error{fmt::format("process {} ({}) {} while hotfix was attached to it", pid_, comm_, gone_how_),
               "nothing was left behind; restart the service if that was not expected", 1};
}

Result<void> Tracee::check_alive() const {
  if (gone_) return std::unexpected(gone_error());
  return {};
}

// ---------------------------------------------------------------- waiting

pid_t Tracee::poll(pid_t tid, int& status, bool block) {
  int nohang = block ? 0 : WNOHANG;
  if (tid == pid_ && we_are_parent_) {
    // Peek first: the leader's final exit status belongs to its parent -- which is us (tests).
    siginfo_t si{};
    if (::waitid(P_PID, tid, &si, WEXITED | WSTOPPED | __WALL | nohang | WNOWAIT) != 0) return -1;
    if (si.si_pid == 0) return 0;
    if (si.si_code == CLD_EXITED || si.si_code == CLD_KILLED || si.si_code == CLD_DUMPED) {
      status = si.si_code == CLD_EXITED ? W_EXITCODE(si.si_status, 0) : W_EXITCODE(0, si.si_status);
      return tid;
    }
    // A stop: consume exactly that, never an exit. Between the peek and here a group exit
    // (SIGTERM) may have turned the stop into an exit, which a plain waitpid would reap
    // -- taking the exit status from the code that owns it.
    siginfo_t stop{};
    if (::waitid(P_PID, tid, &stop, WSTOPPED | __WALL | WNOHANG) != 0) return -1;
    if (stop.si_pid == 0) return 0;
    status = (stop.si_status << 8) | 0x7f;  // what waitpid reports, ptrace event bits included
    return tid;
  }
  return ::waitpid(tid, &status, __WALL | nohang);
}

void Tracee::note_status(TracedThread& th, int status) {
  if (WIFEXITED(status) || WIFSIGNALED(status)) {
    th.exited = true;
    th.stop = StopKind::running;
    if (th.tid == pid_) gone_ = true, gone_how_ = describe_exit(status);
    return;
  }
  if (!WIFSTOPPED(status)) return;
  th.stop = classify_stop(status);
  th.awaiting_first_stop = false;
  if (th.stop_began == TraceClock::time_point{}) th.stop_began = TraceClock::now();
  if (stop_event(status) == PTRACE_EVENT_EXEC) {
    // The old image is gone with all its other threads; this one (now the leader) stays in
    // its exec stop until we detach, so that nothing of ours touches the new image.
    exec_seen_ = true, gone_ = true, gone_how_ = "replaced its program (execve)";
    return;
  }
  if (stop_event(status) == PTRACE_EVENT_CLONE) {
    unsigned long child = 0;
    if (ptrace_req(PTRACE_GETEVENTMSG, th.tid, 0, reinterpret_cast<unsigned long>(&child)) == 0 &&
        !find(static_cast<pid_t>(child))) {
      add_thread(static_cast<pid_t>(child), true);  // may reallocate: `th` is not used after this
    }
  }
}

void Tracee::defer_signal(pid_t tid, int sig) {
  auto* th = find(tid);
  if (!th || sig == 0) return;
  if (th->resume_signal == 0) {
    th->resume_signal = sig;
    siginfo_t si{};
    if (ptrace_req(PTRACE_GETSIGINFO, tid, 0, reinterpret_cast<unsigned long>(&si)) == 0) th->resume_info = si;
  } else {
    th->late_signals.push_back(sig);
  }
}

void Tracee::pass_through(TracedThread& th, int status) {
  if (!WIFSTOPPED(status) || stop_event(status) == PTRACE_EVENT_EXEC) return;  // held until detach
  int sig = stop_event(status) == 0 ? WSTOPSIG(status) : 0;
  int request = th.stop == StopKind::group ? PTRACE_LISTEN : PTRACE_CONT;
  // ESRCH: a SIGKILL woke it (a group exit); it is running to its exit, which we collect.
  if (ptrace_req(request, th.tid, 0, static_cast<unsigned long>(sig)) != 0 && errno == ESRCH) killed_while_held_ = true;
  th.stop = StopKind::running;
  th.stop_began = {};
}

Result<void> Tracee::pump(std::chrono::milliseconds budget) {
  auto deadline = TraceClock::now() + budget;
  do {
    size_t before = threads_.size();
    for (size_t i = 0; i < threads_.size(); ++i) {  // by index: a clone event appends
      int status = 0;
      while (!threads_[i].exited && poll(threads_[i].tid, status) == threads_[i].tid) {
        bool was_running = !threads_[i].stopped();
        note_status(threads_[i], status);
        // A thread we hold can only report its death (SIGKILL); a running one is let go on.
        if (!was_running) break;
        pass_through(threads_[i], status);
      }
    }
    forget_exited();
    HOTFIX_CHECK(check_alive());
    // The leader's death is reported only after every other thread's: look again at once.
    if (threads_.size() < before) continue;
    if (TraceClock::now() >= deadline) break;
    std::this_thread::sleep_for(milliseconds(1));
  } while (TraceClock::now() < deadline);
  return {};
}

Result<int> Tracee::wait_stop(pid_t tid, TraceClock::time_point deadline) {
  Backoff backoff;
  auto next_service = TraceClock::now() + microseconds(200);
  // With every other thread held there is nothing to service: block (bounded by the alarm).
  bool others_running = std::any_of(threads_.begin(), threads_.end(),
                                    [&](auto& th) { return th.tid != tid && !th.exited && !th.stopped(); });
  std::optional<WaitAlarm> alarm;
  if (!others_running) alarm.emplace(deadline);
  bool block = alarm && alarm->armed();
  for (;;) {
    auto* th = find(tid);
    if (!th) return fail(fmt::format("thread {} of process {} exited", tid, pid_));
    int status = 0;
    pid_t r = poll(tid, status, block);
    if (r < 0 && errno == EINTR) r = 0;
    if (r == tid) {
      note_status(*th, status);
      forget_exited();
      HOTFIX_CHECK(check_alive());  // an exec event is a stop, but of a new program
      if (WIFEXITED(status) || WIFSIGNALED(status)) {
        return fail(fmt::format("thread {} of process {} ({}) {}", tid, pid_, comm_, describe_exit(status)));
      }
      return status;
    }
    if (r < 0 && errno == ECHILD) {
      th->exited = true;
      forget_exited();
      HOTFIX_CHECK(pump());  // vanished: killed by an exec in another thread, or by an exit
      return fail(fmt::format("thread {} of process {} vanished", tid, pid_));
    }
    auto now = TraceClock::now();
    if (now >= next_service) {  // others may be stopped by a signal and waiting for us
      for (size_t i = 0; i < threads_.size(); ++i) {  // by index: a clone appends
        if (threads_[i].tid == tid || threads_[i].exited || threads_[i].stopped()) continue;
        int st = 0;
        if (poll(threads_[i].tid, st) == threads_[i].tid) {
          note_status(threads_[i], st);
          pass_through(threads_[i], st);
        }
      }
      forget_exited();
      HOTFIX_CHECK(check_alive());
      next_service = now + microseconds(200);
    }
    if (now >= deadline) return fail(fmt::format("thread {} of process {} did not stop in time", tid, pid_));
    backoff.pause();
  }
}

void Tracee::forget_exited() {
  std::erase_if(threads_, [](const TracedThread& th) { return th.exited; });
}

// ---------------------------------------------------------------- stop / resume

Result<void> Tracee::stop_all(std::chrono::milliseconds timeout) { return stop_all_impl(timeout, true); }

Result<void> Tracee::stop_all_impl(std::chrono::milliseconds timeout, bool resume_on_failure) {
  HOTFIX_CHECK(check_alive());
  HOTFIX_CHECK(pump());  // stops already pending are not ours: deliver them before the window
  boost_.raise();
  window_began_ = TraceClock::now();
  // Interrupt everything first, then collect: the threads stop in parallel on every core.
  for (auto& th : threads_) {
    if (th.stopped() || th.awaiting_first_stop) continue;
    th.stop_began = TraceClock::now();
    if (ptrace_req(PTRACE_INTERRUPT, th.tid) != 0 && errno == ESRCH) th.exited = true;
  }
  std::vector<size_t> pending;
  for (size_t i = 0; i < threads_.size(); ++i)
    if (!threads_[i].exited && !threads_[i].stopped()) pending.push_back(i);
  // The leader reports its death only after every other thread's: collect it last, or a process
  // killed in the window would wait here on the leader while the others' exits go unreaped.
  std::stable_partition(pending.begin(), pending.end(), [&](size_t i) { return threads_[i].tid != pid_; });

  // Collect in interrupt order with blocking waits on one tid at a time (O(1) in the kernel
  // for a specific pid, and no CPU burnt polling); the others stop meanwhile and are
  // collected without waiting. A timer bounds the wait: a thread in uninterruptible sleep
  // cannot stop. Without the timer, poll.
  auto deadline = window_began_ + timeout;
  WaitAlarm alarm(deadline);
  Backoff backoff;
  size_t done = 0;
  // A group exit (a signal we let through just before, exit_group, kill -9) can begin while we
  // collect: threads already collected are then woken by its SIGKILL and die while we count
  // them as held. Only we can collect their exits, and the leader's exit (the process's, for
  // its parent) waits for theirs. So after a thread's exit, and while the leader does not
  // answer, look whether the threads we hold still are, and collect the ones that are not.
  bool exit_seen = false;
  while (!gone_) {
    if (done == pending.size()) {
      if (!exit_seen || take_back_killed(pending) == 0) break;
      exit_seen = false;
      continue;
    }
    size_t i = pending[done];
    const bool leader = threads_[i].tid == pid_;
    if (leader && done + 1 < pending.size()) {
      // The leader's exit is reported only once every other thread is reaped: collect it last.
      std::rotate(pending.begin() + static_cast<std::ptrdiff_t>(done), pending.begin() + static_cast<std::ptrdiff_t>(done) + 1,
                  pending.end());
      continue;
    }
    int status = 0;
    pid_t r;
    if (leader && alarm.armed()) {
      WaitAlarm slice(std::min(deadline, TraceClock::now() + kLeaderSlice));
      r = poll(pid_, status, slice.armed());
      if (!slice.armed() && r == 0) backoff.pause();
    } else {
      r = poll(threads_[i].tid, status, alarm.armed());
    }
    if (r == 0 || (r < 0 && errno == EINTR)) {
      if (TraceClock::now() >= deadline) break;
      if (leader && take_back_killed(pending) > 0) continue;  // collected before the leader, as above
      if (!alarm.armed()) backoff.pause();
      continue;
    }
    if (r < 0) {
      threads_[i].exited = true;
      exit_seen = true;
      ++done;
      continue;
    }
    size_t known = threads_.size();
    note_status(threads_[i], status);  // may append a new thread (by index: no dangling reference)
    for (size_t n = known; n < threads_.size(); ++n) pending.push_back(n);  // new threads: their first stop
    auto& th = threads_[i];
    if (th.exited || !th.stopped()) {
      done += th.exited;
      exit_seen = exit_seen || th.exited;
      continue;
    }
    // A signal stop becomes an interrupt stop with the signal pending again (or, if that cannot
    // be done, the signal is held for the resume as before).
    for (int n = 0; th.stop == StopKind::signal && !th.exited; ++n) {
      int again = n < 64 ? requeue_at_signal_stop(pid_, th.tid, WSTOPSIG(status)) : 0;
      if (again == 0) {
        defer_signal(th.tid, WSTOPSIG(status));
        break;
      }
      if (again < 0) th.exited = true;
      else note_status(th, status = again);
    }
    exit_seen = exit_seen || th.exited;
    if (auto rr = arch::regs__read(th.tid, th.regs); !rr && errno == ESRCH && !th.exited) {
      // Killed since its stop (see above): it reports its exit next.
      th.stop = StopKind::running;
      killed_while_held_ = true;
      pending.push_back(i);
    }
    ++done;
    backoff = {};
  }
  pending.erase(pending.begin(), pending.begin() + static_cast<std::ptrdiff_t>(std::min(done, pending.size())));
  forget_exited();
  pause_ = {};
  pause_.threads = threads_.size();
  pause_.stop_latency = TraceClock::now() - window_began_;
  if (gone_) {
    boost_.lower();
    return std::unexpected(gone_error());
  }
  if (!pending.empty() && !we_are_parent_ && leader_is_zombie()) {
    // Every thread but the leader is gone and the kernel has not reported the leader's exit
    // to us yet (it waits for the group to empty): the process has exited, say so.
    gone_ = true, gone_how_ = zombie_exit_how();
    boost_.lower();
    return std::unexpected(gone_error());
  }
  if (!pending.empty()) {
    std::string stuck;
    for (auto& th : threads_)
      if (!th.stopped()) stuck += fmt::format("{}{} (state {})", stuck.empty() ? "" : ", ", th.tid, status_field(th.tid, "State"));
    if (resume_on_failure) (void)resume_all();
    boost_.lower();
    if (gone_) return std::unexpected(gone_error());  // it was dying: resume_all collected it
    return fail(fmt::format("could not stop every thread of process {} ({}) within {} ms: {} did not stop", pid_, comm_,
                            timeout.count(), stuck),
                "a thread in uninterruptible sleep (state D: disk, NFS, vfork) cannot be stopped; retry later");
  }
  return {};
}

Result<void> Tracee::resume_one(TracedThread& th, bool detach) {
  if (!th.stopped()) return {};
  Result<void> result;
  if (th.regs_dirty) {
    result = arch::regs__write(th.tid, th.regs);
    th.regs_dirty = !result;
  }
  if (th.resume_info && th.resume_signal == th.resume_info->si_signo)
    (void)ptrace_req(PTRACE_SETSIGINFO, th.tid, 0, reinterpret_cast<unsigned long>(&*th.resume_info));
  int request = detach ? PTRACE_DETACH : th.stop == StopKind::group ? PTRACE_LISTEN : PTRACE_CONT;
  if (ptrace_req(request, th.tid, 0, static_cast<unsigned long>(th.resume_signal)) != 0) {
    int err = errno;
    // ESRCH: a SIGKILL woke it while we held it (kill -9, or a group exit). It is not gone: it
    // reports its exit to us, and the leader's exit waits for that report.
    if (err == ESRCH) killed_while_held_ = true;
    else if (result) result = fail(fmt::format("cannot resume thread {} of process {}: {}", th.tid, pid_, errno_text(err)));
  }
  for (int sig : th.late_signals) ::syscall(SYS_tgkill, pid_, th.tid, sig);
  auto held = TraceClock::now() - th.stop_began;
  pause_.max_pause = std::max<std::chrono::nanoseconds>(pause_.max_pause, held);
  th.stop = StopKind::running;
  th.resume_signal = 0;
  th.resume_info.reset();
  th.late_signals.clear();
  th.stop_began = {};
  return result;
}

Result<void> Tracee::resume_all() {
  Result<void> first_error;
  pause_.max_pause = {};
  for (auto& th : threads_) {  // the order they were interrupted: the longest-held go first
    auto r = resume_one(th, false);
    if (!r && first_error) first_error = r;
  }
  pause_.window = TraceClock::now() - window_began_;
  boost_.lower();
  forget_exited();
  if (std::exchange(killed_while_held_, false)) {
    // Killed while we held it: collect the exits now (the process's is last), and say so --
    // not whatever an inspection of the dying process failed with meanwhile.
    HOTFIX_CHECK(pump(std::chrono::seconds(2)));
  }
  return first_error;
}

Result<void> Tracee::stop_thread(pid_t tid, std::chrono::milliseconds timeout) {
  HOTFIX_CHECK(check_alive());
  auto* th = find(tid);
  if (!th) return fail(fmt::format("thread {} is not part of process {} ({})", tid, pid_, comm_));
  if (th->stopped()) return {};
  HOTFIX_CHECK(pump());
  th = find(tid);
  if (!th) return fail(fmt::format("thread {} of process {} exited", tid, pid_));
  if (th->stopped()) return {};
  th->stop_began = TraceClock::now();
  if (!th->awaiting_first_stop && ptrace_req(PTRACE_INTERRUPT, tid) != 0)
    return fail(fmt::format("cannot interrupt thread {} of process {}: {}", tid, pid_, errno_text(errno)));
  int status = HOTFIX_TRY(wait_stop(tid, TraceClock::now() + timeout));
  th = find(tid);
  for (int n = 0; th->stop == StopKind::signal; ++n) {
    int again = n < 64 ? requeue_at_signal_stop(pid_, tid, WSTOPSIG(status)) : 0;
    if (again == 0) {
      defer_signal(tid, WSTOPSIG(status));
      break;
    }
    if (again < 0) th->exited = true;
    else note_status(*th, status = again);
    forget_exited();
    HOTFIX_CHECK(check_alive());
    th = find(tid);
    if (!th) return fail(fmt::format("thread {} of process {} exited", tid, pid_));
  }
  return arch::regs__read(tid, th->regs);
}

Result<void> Tracee::resume_thread(pid_t tid) {
  auto* th = find(tid);
  if (!th) return check_alive();
  return resume_one(*th, false);
}

Result<void> Tracee::set_regs(pid_t tid, const arch::RegsBuffer& regs) {
  auto* th = find(tid);
  if (!th || !th->stopped()) return fail(fmt::format("thread {} is not stopped by us", tid));
  th->regs_dirty = true;
  return arch::regs__write(tid, regs);
}

Result<void> Tracee::restore_regs(pid_t tid) {
  auto* th = find(tid);
  if (!th) return check_alive();
  if (!th->regs_dirty) return {};
  HOTFIX_CHECK(arch::regs__write(tid, th->regs));
  th->regs_dirty = false;
  return {};
}

Result<void> Tracee::step(pid_t tid, int request, int sig) {
  auto* th = find(tid);
  if (!th || !th->stopped()) return fail(fmt::format("thread {} is not stopped by us", tid));
  if (ptrace_req(request, tid, 0, static_cast<unsigned long>(sig)) != 0)
    return fail(fmt::format("cannot resume thread {} of process {}: {}", tid, pid_, errno_text(errno)));
  th->stop = StopKind::running;
  return {};
}

// ---------------------------------------------------------------- detach

// After an exec only the thread that exec'd is left (as the leader), held in its exec stop:
// let it go untouched, and collect the old image's threads.
Result<void> Tracee::detach_after_exec() {
  reap_dead_threads();
  for (auto& th : threads_) {
    if (th.exited) continue;
    if (!th.stopped()) {
      int status = 0;
      for (int i = 0; i < 200 && poll(th.tid, status) == 0; ++i) ::usleep(1000);
    }
    (void)ptrace_req(PTRACE_DETACH, th.tid, 0, 0);
  }
  threads_.clear();
  return {};
}

Result<void> Tracee::detach() {
  if (detached_) return {};
  detached_ = true;
  if (exec_seen_) return detach_after_exec();
  if (gone_) reap_dead_threads();
  if (gone_ || threads_.empty()) return {};
  // PTRACE_DETACH needs a stopped thread. A thread that will not stop (state D) keeps a
  // pending interrupt; the kernel releases it when we exit.
  Result<void> result;
  if (!all_stopped()) {
    result = stop_all_impl(std::chrono::seconds(5), false);
    if (!result && gone_) {
      if (exec_seen_) return detach_after_exec();
      reap_dead_threads();
      threads_.clear();
      return {};
    }
    if (!result && status_field(pid_, "State").rfind("Z", 0) == 0) {
      // It died meanwhile (a signal we let through on resume): collect its threads so that the
      // leader's exit reaches its parent, and there is nothing left to detach.
      reap_dead_threads();
      threads_.clear();
      return {};
    }
    // A thread that cannot stop (state D) was already reported by the operation that failed
    // to stop it; saying it again here (with another timeout) would only contradict it. The
    // stopped ones are let go below; the kernel releases the others when we exit.
    if (!result) result = {};
  }
  killed_while_held_ = false;
  for (auto& th : threads_) {
    if (!th.stopped()) continue;
    auto r = resume_one(th, true);
    if (!r && result) result = r;
  }
  // A thread the detach could not let go (killed meanwhile) stays ours until collected.
  if (killed_while_held_) reap_dead_threads();
  boost_.lower();
  threads_.clear();
  return result;
}

// ---------------------------------------------------------------- one thread on its own

namespace {
// Threads seized by a ThreadHold::stop that gave up waiting: they will stop (the interrupt is
// pending) and must then be let go. Only this (the tracer) thread can.
std::vector<pid_t>& late_threads() {
  static std::vector<pid_t> tids;
  return tids;
}

// The wait status of `tid`'s next stop or exit, or 0 at `deadline`.
int wait_thread(pid_t tid, TraceClock::time_point deadline) {
  for (int spins = 0;; ++spins) {
    int status = 0;
    pid_t r = ::waitpid(tid, &status, __WALL | WNOHANG);
    if (r == tid) return status;
    if (r < 0 && errno != EINTR) return -1;
    if (TraceClock::now() >= deadline) return 0;
    // A running thread stops within microseconds of the interrupt: yield first, then sleep.
    if (spins < 64) ::sched_yield();
    else ::usleep(50);
  }
}
}  // namespace

void ThreadHold::release_late() {
  auto& late = late_threads();
  std::erase_if(late, [](pid_t tid) {
    int status = 0;
    pid_t r = ::waitpid(tid, &status, __WALL | WNOHANG);
    if (r == 0) return false;  // not stopped yet
    if (r == tid && WIFSTOPPED(status)) {
      int sig = classify_stop(status) == StopKind::signal ? WSTOPSIG(status) : 0;
      (void)ptrace_req(PTRACE_DETACH, tid, 0, static_cast<unsigned long>(sig));
    }
    return true;  // detached, exited, or no longer ours
  });
}

size_t ThreadHold::late_count() { return late_threads().size(); }

Result<ThreadHold> ThreadHold::stop(pid_t pid, pid_t tid, std::chrono::milliseconds timeout) {
  release_late();
  if (ptrace_req(PTRACE_SEIZE, tid, 0, 0) != 0) {
    int err = errno;
    pid_t tracer = process__tracer(tid);
    return fail(fmt::format("cannot seize thread {} of process {}: {}", tid, pid, errno_text(err)),
                tracer ? fmt::format("it is traced by pid {}; detach that tool first", tracer)
                       : std::string("check that it still runs and that you are root"));
  }
  if (ptrace_req(PTRACE_INTERRUPT, tid) != 0) {
    int err = errno;
    late_threads().push_back(tid);  // seized: it must still be let go
    release_late();
    return fail(fmt::format("cannot interrupt thread {} of process {}: {}", tid, pid, errno_text(err)));
  }
  int status = wait_thread(tid, TraceClock::now() + timeout);
  if (status == 0) {
    late_threads().push_back(tid);
    return fail(fmt::format("thread {} of process {} did not stop within {} ms (state {})", tid, pid, timeout.count(),
                            status_field(tid, "State")),
                "it is in uninterruptible sleep; it is let go as soon as it stops");
  }
  if (status < 0 || !WIFSTOPPED(status)) return fail(fmt::format("thread {} of process {} exited", tid, pid));
  // A signal-delivery stop: the thread dequeued a signal on its way out of the kernel; its
  // registers are its user state all the same, and the detach delivers the signal.
  int sig = classify_stop(status) == StopKind::signal ? WSTOPSIG(status) : 0;
  arch::RegsBuffer regs{};
  if (auto r = arch::regs__read(tid, regs); !r) {
    (void)ptrace_req(PTRACE_DETACH, tid, 0, static_cast<unsigned long>(sig));
    return std::unexpected(r.error());
  }
  return ThreadHold(tid, sig, regs);
}

ThreadHold::ThreadHold(ThreadHold&& o) noexcept : tid_(o.tid_), signal_(o.signal_), regs_(o.regs_) { o.tid_ = 0; }

ThreadHold::~ThreadHold() {
  if (tid_) (void)ptrace_req(PTRACE_DETACH, tid_, 0, static_cast<unsigned long>(signal_));
}

}  // namespace hotfix
