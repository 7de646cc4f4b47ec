#include "cli/stop.hpp"

#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace hotfix::cli {

// The events the report loop waits for, as file descriptors: SIGINT/SIGTERM and the target's exit.
Result<StopSources> StopSources::open(pid_t pid) {
  StopSources s;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  // Blocked from before attaching: a Ctrl-C during attach is handled after it, with a report.
  sigprocmask(SIG_BLOCK, &set, nullptr);
  s.signals.reset(::signalfd(-1, &set, SFD_CLOEXEC));
  if (!s.signals) return fail(fmt::format("cannot watch for signals: {}", errno_text(errno)));
  s.target.reset(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!s.target) {
    if (errno == ESRCH) return fail(fmt::format("no process with pid {}", pid), "check the pid with `ps -p PID`");
    return fail(fmt::format("cannot watch pid {} for exit: {}", pid, errno_text(errno)));
  }
  return s;
}

Wake wait_until(StopSources& stop, std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) return Wake::tick;
    pollfd fds[2] = {{stop.signals.get(), POLLIN, 0}, {stop.target.get(), POLLIN, 0}};
    if (::poll(fds, 2, static_cast<int>(left) + 1) <= 0) continue;
    if (fds[0].revents & POLLIN) return Wake::signal;
    if (fds[1].revents & POLLIN) return Wake::target_exited;
  }
}

}  // namespace hotfix::cli
